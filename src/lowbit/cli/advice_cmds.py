"""``lowbit estimate`` (memory table) and ``lowbit recommend`` (which method, and why)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lowbit.cli import app, console, fail, one_line_errors

GOALS = {
    "training-speed": ("FP8 training (E4M3 forward, E5M2 gradients, delayed scaling)",
                       "fp8 (training: lowbit.training.fp8_autocast)",
                       "FP8 tensor cores on Hopper-class GPUs (NVIDIA's figure: about twice "
                       "BF16's throughput; lowbit's FP8 training path ran on one H200, unbenchmarked)."),
    "inference-int8": ("SmoothQuant + W8A8 INT8", "int8-smoothquant",
                       "Best W8A8 accuracy: moves activation outliers into the weights; INT8 "
                       "kernels are everywhere (CPU included)."),
    "inference-int4-quality": ("AWQ or GPTQ, INT4 weights (group 128, or 64 when the width "
                               "needs it)", "int4-gptq / int4-awq",
                               "The best 4-bit weights lowbit makes, from calibration data "
                               "(still a measurable loss: see docs/algorithms.md); GPTQ is "
                               "slower to calibrate and sometimes more accurate."),
    "inference-int4-speed": ("AWQ, INT4 weights", "int4-awq",
                             "Faster calibration than GPTQ and good engine support "
                             "(TensorRT-LLM, vLLM)."),
    "max-accuracy": ("QAT (quantization-aware training)", "lowbit.training.prepare_qat",
                     "Retraining with the quantization in the loop compensates its error."),
    "quick": ("Basic PTQ (round to nearest)", "fp8-dynamic / int8-dynamic / int4-weight-only",
              "Fastest: no data or minutes of calibration; good enough for many workloads."),
}


@app.command("estimate")
def estimate_cmd(
    model: Optional[str] = typer.Argument(
        None, help="a parameter count (70B, 7.5B, 135M), a model folder or config.json, or a "
        "known model name"),
    params: Optional[str] = typer.Option(None, "--params", help="parameter count, e.g. 70B "
                                         "(with MODEL: overrides the model's own count)"),
    seq_len: int = typer.Option(4096, help="KV-cache sequence length (tokens)"),
    batch: int = typer.Option(1, help="sequences in the batch"),
    kv_format: str = typer.Option("fp16", help="KV-cache precision: fp16, bf16, fp8, int8 ..."),
    group_size: int = typer.Option(128, help="group size of INT4 weights (16-bit scales)"),
) -> None:
    """Memory of the weights at each precision (scales included) and of the KV cache.

    MODEL is a parameter count (lowbit estimate 70B) unless it is an existing path or a known
    model name; a model's architecture adds the KV cache.
    """
    from lowbit.eval.memory import KNOWN, estimate, parse_params, resolve_arch

    with one_line_errors("estimate"):
        if model is None and params is None:
            fail("give a parameter count like 70B, a MODEL (folder, config.json or one of "
                 f"{', '.join(KNOWN)}) or --params 70B")
        if model is not None and _is_param_count(model, KNOWN):
            if params is not None:
                fail(f"give the parameter count once: {model} or --params {params}")
            model, params = None, model
        if model is not None and model.lower() not in KNOWN and not Path(model).exists():
            fail(f"unknown model {model!r}: expected a parameter count like 70B or 135M, a "
                 f"model folder or config.json, or one of {', '.join(KNOWN)}")
        arch = resolve_arch(model) if model is not None else None
        n = parse_params(params) if params is not None else arch.params()
        if seq_len < 1 or batch < 1:
            fail("--seq-len and --batch must be positive")
        est = estimate(n, arch, seq_len, batch, kv_format, group_size)
    moe = est.get("moe")
    title = f"{arch.name if arch else ''} {n / 1e9:.2f}B parameters".strip()
    if moe:
        title += f" ({moe['active_params'] / 1e9:.2f}B active per token)"
    t = Table(title=f"weights: {title}")
    fp32 = est["weights"][0]["total"]
    unit, div = ("GB", 1e9) if fp32 >= 1e10 else ("MB", 1e6)
    cols = ["precision", "bits/weight", f"codes {unit}", f"scales {unit}", f"total {unit}"]
    for c in cols + ([f"active/token {unit}"] if moe else []) + ["vs FP32"]:
        t.add_column(c, justify="right")
    for r in est["weights"]:
        bpw = 8 * r["total"] / n
        act = [f"{r['active_total'] / div:.2f}"] if moe else []
        t.add_row(r["precision"], f"{bpw:.3g}", f"{r['codes'] / div:.1f}",
                  f"{r['scales'] / div:.2f}", f"{r['total'] / div:.1f}", *act,
                  f"{fp32 / r['total']:.1f}x")
    console.print(t)
    if moe:
        console.print(
            f"mixture of experts: {moe['experts']} experts, top-{moe['top_k']}, in "
            f"{moe['moe_layers']} of {arch.layers} layers; total = resident weights (every "
            "expert); active = read per token (attention, dense MLPs, shared experts, "
            f"router, {moe['top_k']} routed experts per MoE layer, embeddings and LM head)")
    console.print(f"scales: int4 one fp16 per {group_size}, nvfp4 one e4m3 per 16 (+1 fp32 per "
                  "tensor), mxfp4 one e8m0 per 32; GB = 1e9 bytes, MB = 1e6 bytes")
    if "kv_cache" in est:
        kv = est["kv_cache"]
        console.print(
            f"KV cache ({kv_format}): {kv['bytes'] / 1e9:.3g} GB for {batch} x {seq_len} tokens "
            f"({kv['per_token_bytes'] / 1024:.0f} KiB per token: 2 x {arch.layers} layers x "
            f"{arch.kv_heads} KV heads x {arch.hd} dims)")


def _is_param_count(model: str, known) -> bool:
    """Whether the MODEL argument is a parameter count: it reads as one (70B, 7.5B, 135M,
    1e9) and is neither an existing path nor a known model name."""
    from lowbit.errors import ConfigError
    from lowbit.eval.memory import parse_params

    if model.lower() in known or Path(model).exists():
        return False
    try:
        parse_params(model)
    except ConfigError:
        return False
    return True


CANDIDATES = ["fp8-dynamic", "int8-dynamic", "int8-smoothquant", "int4-awq", "int4-gptq",
              "int4-weight-only", "nvfp4-weight-only"]


@app.command("recommend")
def recommend_cmd(
    goal: Optional[str] = typer.Option(None, help="|".join(GOALS)),
    model: Optional[str] = typer.Option(None, help="measure candidates on this model"),
    text: Optional[str] = typer.Option(None, help="text file to calibrate and measure on, or "
                                       "sample:austen_pp"),
    max_size: Optional[float] = typer.Option(None, help="largest weight memory allowed (GB)"),
    candidates: str = typer.Option(",".join(CANDIDATES), help="comma-separated recipes"),
    samples: int = typer.Option(8, help="calibration windows"),
    windows: int = typer.Option(4, help="perplexity windows"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    group_size: Optional[int] = typer.Option(
        None, help="group size for the grouped candidates, which must divide every layer's "
        "width "
        "(default: each recipe's own, with a divisor of the width where it does not)"),
) -> None:
    """Which method to use for a goal and why; with --model/--text, measure and pick."""
    if model is None:
        if goal is None:
            fail("give --goal, or --model with --text to measure candidates")
        if goal not in GOALS:
            fail(f"unknown goal {goal!r}; expected one of: {', '.join(GOALS)}")
        method, recipe, why = GOALS[goal]
        t = Table(show_header=False)
        t.add_row("goal", goal)
        t.add_row("method", method)
        t.add_row("lowbit", recipe)
        t.add_row("why", why)
        console.print(t)
        return
    if text is None:
        fail("--model needs --text to measure the candidates on")
    from lowbit.cli.quantize_cmds import text_source

    text = text_source(text, "--text")
    import copy

    import lowbit
    from lowbit import recipes
    from lowbit.data import (calibration_batches, forward_loop_from_batches, load_model,
                             read_text, split_tokens, tokenize)
    from lowbit.eval import perplexity
    from lowbit.eval.footprint import weight_footprint

    names = [c.strip() for c in candidates.split(",") if c.strip()]
    with one_line_errors("recommend"):
        for n in names:
            recipes.load(n)
        with console.status(f"loading {model}"):
            base, tok = load_model(model)
        _, ev = split_tokens(tokenize(tok, read_text(text)))
        loop = forward_loop_from_batches(calibration_batches(tok, text, n_samples=samples,
                                                             seq_len=seq_len))
        rows = []
        with console.status("FP baseline"):
            p0 = perplexity(base, ev, seq_len=seq_len, n_windows=windows)["ppl"]
        for n in names:
            with console.status(f"measuring {n}"):
                m = copy.deepcopy(base)
                over = {"group_size": group_size} if group_size is not None and \
                    recipes.takes_group_size(n) else {}
                lowbit.quantize(m, n, forward_loop=loop, **over)
                size = weight_footprint(m)["bytes"] / 1e9
                p = perplexity(m, ev, seq_len=seq_len, n_windows=windows)["ppl"]
            rows.append((n, size, p))
            del m
    fits = [r for r in rows if max_size is None or r[1] <= max_size]
    t = Table(title=f"{model}: {windows} windows x {seq_len} tokens of {Path(str(text)).name}, "
                    f"FP perplexity {p0:.3f}")
    for c in ("recipe", "weights GB", "perplexity", "delta", "fits"):
        t.add_column(c, justify="right")
    for n, size, p in sorted(rows, key=lambda r: r[2]):
        t.add_row(n, f"{size:.3f}", f"{p:.3f}", f"{100 * (p / p0 - 1):+.2f}%",
                  "yes" if (max_size is None or size <= max_size) else "no")
    console.print(t)
    if not fits:
        fail(f"no candidate fits in {max_size} GB; the smallest needs "
             f"{min(r[1] for r in rows):.3f} GB", code=1)
    best = min(fits, key=lambda r: r[2])
    console.print(f"recommended: [bold]{best[0]}[/] ({best[1]:.3f} GB, perplexity {best[2]:.3f})")
