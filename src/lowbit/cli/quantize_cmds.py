"""``lowbit quantize`` and ``lowbit eval``: the main jobs from the command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lowbit.cli import app, console, fail, one_line_errors
from lowbit.cli.export_cmd import (ALLOW_REQUANTIZE, EMBEDDING_TYPE, NO_VOCAB, OUTPUT_TYPE,
                                   export_options, gguf_options)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


def _check_model_path(model: str) -> None:
    p = Path(model)
    if model.lower() in ("smollm2-135m", "default"):
        return
    if not p.exists():
        fail(f"model {model} does not exist (expected a transformers model folder, a .gguf "
             "file or 'smollm2-135m')")
    if p.is_dir() and not (p / "config.json").exists():
        fail(f"{model} is not a model folder: no config.json in it")
    if p.is_file() and p.suffix != ".gguf":
        fail(f"{model} is not a model: expected a folder with config.json or a .gguf file")


def _load(model: str):
    from lowbit.data import load_model

    with console.status(f"loading {model}"):
        return load_model(model)


def text_source(text: "str | None", flag: str):
    """A text option of the command line -> what ``read_text`` takes: ``"sample:NAME"`` (a
    text packaged with lowbit, checked here) or an existing file as a ``Path`` (never the
    option's characters taken as literal text). None stays None; anything else exits 2."""
    if text is None:
        return None
    from lowbit.data.samples import SAMPLE_PREFIX, sample_text_names

    if text.startswith(SAMPLE_PREFIX):
        if text[len(SAMPLE_PREFIX):] not in sample_text_names():
            fail(f"{flag} {text}: no such packaged text; expected one of: "
                 + ", ".join(SAMPLE_PREFIX + n for n in sample_text_names()))
        return text
    p = Path(text).expanduser()
    if not p.is_file():
        fail(f"{flag} {text}: no such text file (or use a packaged text: "
             + ", ".join(SAMPLE_PREFIX + n for n in sample_text_names()) + ")")
    return p


def _text_ids(tok, text):
    from lowbit.data import read_text, tokenize

    text = text_source(str(text), "--text")
    body = read_text(text)
    ids = tokenize(tok, body)
    if ids.numel() < 2:
        fail(f"text file {text} holds no tokens")
    return ids


AUTO_CANDIDATES = "bf16,int8-weight-only,int4-awq,nvfp4-weight-only"


def _max_ctx(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="transformers model folder, .gguf file, or "
                                "smollm2-135m"),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r",
                                         help="preset name or YAML file (or use --auto)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    calib: Optional[str] = typer.Option(None, help="calibration text file, or a text packaged "
                                        "with lowbit (sample:austen_pp)"),
    auto: Optional[float] = typer.Option(
        None, "--auto", help="automatic mixed precision: a format per layer within this many "
        "bits per weight (scales included) at the least measured loss; needs --calib"),
    candidates: str = typer.Option(AUTO_CANDIDATES, help="formats --auto chooses from "
                                   "(comma-separated presets, bf16 = left unquantized)"),
    stream: bool = typer.Option(False, help="read and quantize one decoder block at a time "
                                "from the safetensors checkpoint (for models larger than "
                                "memory); writes the lowbit format; resumes after an "
                                "interruption"),
    resume: bool = typer.Option(True, help="with --stream: continue an interrupted run"),
    chunk_size: int = typer.Option(8, help="calibration windows per block call (block by "
                                   "block runs; under torchrun each rank takes whole chunks)"),
    samples: int = typer.Option(128, help="calibration windows"),
    seq_len: int = typer.Option(512, help="tokens per calibration window"),
    group_size: Optional[int] = typer.Option(None, help="override the recipe's group size"),
    kv_cache: Optional[str] = typer.Option(None, help="quantize the KV cache: fp8 | int8 | int4 | nvfp4"),
    format: str = typer.Option("lowbit", "--format", "-f",
                               help="lowbit | compressed-tensors | gguf | onnx"),
    force: bool = typer.Option(False, help="replace --out if it exists"),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help=ALLOW_REQUANTIZE),
    no_vocab: bool = typer.Option(False, "--no-vocab", help=NO_VOCAB),
    moe_calibrate_all_experts: Optional[bool] = typer.Option(
        None, "--moe-calibrate-all-experts/--no-moe-calibrate-all-experts",
        help="MoE models: every calibration token also passes through every expert, for "
             "statistics only (default: on when the recipe has algorithm steps)"),
    algorithm: Optional[str] = typer.Option(
        None, "--algorithm", help="add algorithm steps to the recipe (comma-separated: gptq, "
        "awq, imatrix, smoothquant); with a gguf-* mix preset, gptq/awq/imatrix pick its "
        "-gptq/-awq/-imatrix variant; needs --calib"),
    imatrix: Optional[Path] = typer.Option(
        None, "--imatrix", help="GGUF block types: an importance matrix file written by "
        "llama-imatrix (adds an imatrix step reading it; no --calib needed)"),
    embedding_type: Optional[str] = typer.Option(None, "--embedding-type",
                                                 "--token-embedding-type",
                                                 help=EMBEDDING_TYPE),
    output_type: Optional[str] = typer.Option(None, "--output-type", "--output-tensor-type",
                                              help=OUTPUT_TYPE),
    pure: bool = typer.Option(False, "--pure", help="gguf-* mixes: every linear the mix's "
                              "default type (llama-quantize's --pure; fallbacks still apply)"),
) -> None:
    """Quantize a model with a recipe (or --auto BITS) and write a checkpoint (exit 0 ok, 2 bad
    input, 1 failure). Under torchrun (torchrun --nproc-per-node N -m lowbit quantize ...)
    each process calibrates on its share of the windows (statistics all-reduced) and rank 0
    writes."""
    import lowbit
    from lowbit import recipes
    from lowbit.export import exporter_names
    from lowbit.pipeline.distributed import init_from_env

    _check_model_path(model)
    if out.exists() and not force:
        fail(f"output folder {out} exists; pass --force to replace it")
    if format not in exporter_names():
        fail(f"unknown --format {format!r}; expected one of: {', '.join(exporter_names())}")
    gguf_opts = gguf_options(format, allow_requantize, no_vocab)
    if samples < 1 or seq_len < 2 or chunk_size < 1:
        fail("--samples and --chunk-size must be >= 1 and --seq-len >= 2")
    if (recipe is None) == (auto is None):
        fail("pass either --recipe NAME|FILE or --auto BITS (exactly one)")
    if auto is not None and calib is None:
        fail("--auto measures each layer's sensitivity and needs --calib TEXT_FILE")
    if stream:
        if auto is not None:
            fail("--stream runs one block at a time and cannot measure whole-model "
                 "sensitivities; run --auto without --stream, or --stream with the recipe "
                 "--auto wrote")
        if format != "lowbit":
            fail(f"--stream writes the lowbit format, not {format}; convert it afterwards "
                 "with `lowbit export`")
        if not Path(model).is_dir() or not any(Path(model).glob("*.safetensors")):
            fail(f"--stream needs a transformers model folder with safetensors weights; "
                 f"{model} has none")
    calib = text_source(calib, "--calib")
    over = {}
    if group_size is not None:
        over["group_size"] = group_size
    if kv_cache is not None:
        over["kv_cache"] = kv_cache
    if moe_calibrate_all_experts is not None:
        over["moe_calibrate_all_experts"] = moe_calibrate_all_experts
    rec = None
    if recipe is None and (algorithm or imatrix or pure or embedding_type or output_type):
        fail("--algorithm, --imatrix, --pure, --embedding-type and --output-type go with "
             "--recipe, not --auto")
    if recipe is not None:
        with one_line_errors("loading the recipe"):
            rec = recipes.load(recipe, **over)
            rec = _recipe_options(rec, algorithm, imatrix, pure, embedding_type,
                                  output_type)
        if rec.gguf_mix is None and (embedding_type or output_type):
            gguf_opts.update(gguf_options(format, False, False, embedding_type, output_type))
        if stream and rec.gguf_mix is not None:
            fail(f"--stream does not expand GGUF mixes (recipe {rec.name}); quantize in "
                 "memory (without --stream)")
        if calib is None and (rec.has_static_activations() or _needs_data(rec)):
            fail(f"recipe {rec.name} needs calibration data: pass --calib TEXT_FILE")
    with one_line_errors("starting torch.distributed"):
        comm = init_from_env()
    if stream:
        _quantize_stream(model, rec, out, calib, samples, seq_len, force, resume, comm,
                         chunk_size)
    else:
        _quantize_in_memory(lowbit, model, rec, out, calib, samples, seq_len, format, force,
                            comm, auto, candidates, over, chunk_size, gguf_opts)


def _needs_data(rec) -> bool:
    """Whether ``rec``'s algorithm steps need calibration data (an imatrix step reading a
    file does not)."""
    return any(not (a.name == "imatrix" and a.args.get("file")) for a in rec.algorithms)


def _recipe_options(rec, algorithm, imatrix, pure, embedding_type, output_type):
    """``rec`` with the command line's --algorithm / --imatrix steps and (a gguf_mix recipe)
    --pure / --embedding-type / --output-type as its mix options."""
    from lowbit import recipes
    from lowbit.pipeline.algorithms import algorithm_names

    from lowbit.config import Recipe

    steps = [a.model_dump(exclude_defaults=True) for a in rec.algorithms]
    names = [a.strip() for a in (algorithm or "").split(",") if a.strip()]
    for name in names:
        if name not in algorithm_names():
            fail(f"--algorithm {name!r}; expected one of: {', '.join(algorithm_names())}")
        if name not in {a["name"] for a in steps}:
            steps.append({"name": name})
    variant = f"{rec.name}-{names[0]}" if len(names) == 1 else None
    if rec.gguf_mix is not None and not rec.algorithms and variant in recipes.names():
        v = recipes.load(variant)  # a gguf-* mix preset + --algorithm X is its -X variant
        if [a.model_dump(exclude_defaults=True) for a in v.algorithms] == steps:
            rec = Recipe.parse({**rec.to_dict(), "name": v.name,
                                "description": v.description}, f"recipe {v.name}")
    if imatrix is not None:
        if not imatrix.is_file():
            fail(f"--imatrix {imatrix}: no such file")
        steps = [a for a in steps if a["name"] != "imatrix"]
        steps.insert(0, {"name": "imatrix", "args": {"file": str(imatrix)}})
    over: dict = {}
    if steps != [a.model_dump(exclude_defaults=True) for a in rec.algorithms]:
        over["algorithms"] = steps
    mix = {k: v for k, v in (("embedding_type", embedding_type), ("output_type", output_type),
                             ("pure", True if pure else None)) if v is not None}
    if mix:
        if rec.gguf_mix is None:
            if pure:
                fail(f"--pure is for gguf-* mix presets; recipe {rec.name} has no gguf_mix")
        else:
            over["gguf_mix"] = mix
    return recipes.apply_overrides(rec, **over) if over else rec


def _calib_ids(tok, calib, samples: int, seq_len: int):
    from lowbit.data import calibration_batches

    return calibration_batches(tok, calib, n_samples=samples, seq_len=seq_len)


def _quantize_in_memory(lowbit, model, rec, out, calib, samples, seq_len, format, force, comm,
                        auto, candidates, over, chunk_size, gguf_opts) -> None:
    import torch

    from lowbit.eval.footprint import weight_footprint
    from lowbit.export import save

    t0 = time.perf_counter()
    auto_report = None
    with one_line_errors("quantization"):
        m, tok = _load(model)
        ctx = _max_ctx(m)
        if ctx and seq_len > ctx:
            fail(f"--seq-len {seq_len} is beyond the model's context of {ctx} tokens")
        ids = _calib_ids(tok, calib, samples, seq_len) if calib is not None else None
        if auto is not None:
            rec, auto_report = _auto_recipe(m, ids, auto, candidates, over)
        before = weight_footprint(m)
        with _progress() as prog, torch.no_grad():
            task = prog.add_task(f"{rec.name}: blocks", total=None)

            def on_block(done, total, name):
                prog.update(task, completed=done, total=total,
                            description=f"{rec.name}: {name}")

            if ids is None:
                lowbit.quantize(m, rec, progress=on_block)
            elif comm.enabled:  # each rank takes its share of the windows
                lowbit.quantize(m, rec, calib_data=ids, progress=on_block, comm=comm,
                                chunk_size=chunk_size)
            else:
                cal = prog.add_task("calibrating", total=None)

                def loop(mod):
                    prog.update(cal, completed=0, total=len(ids))
                    for row in ids:
                        mod(row.unsqueeze(0))
                        prog.advance(cal)
                lowbit.quantize(m, rec, forward_loop=loop, progress=on_block,
                                chunk_size=chunk_size)
        after = weight_footprint(m)
        if comm.is_main:
            with console.status(f"writing {format} checkpoint to {out}"):
                opts = {**export_options(m, tok, format, seq_len), **gguf_opts}
                save(m, out, format=format, overwrite=force, **opts)
                if auto_report is not None:
                    from lowbit import recipes

                    recipes.save(rec, out / "auto_recipe.yaml")
        comm.barrier()
    if not comm.is_main:
        return
    report = m.lowbit_report
    t = Table(title=f"{model} -> {out} ({format})")
    t.add_column("")
    t.add_column("value", justify="right")
    counts: dict[str, int] = {}
    for name in report.quantized:
        mod = m.get_submodule(name)
        spec = mod.weight_quantizer.spec
        key = spec.short() if spec is not None else "activations only"
        counts[key] = counts.get(key, 0) + 1
    for k, n in sorted(counts.items()):
        t.add_row(f"layers {k}", str(n))
    mix = getattr(report, "gguf_mix", None)
    if mix:
        t.add_row("GGUF mix", f"{rec.name}: {mix['ftype'].upper()}, token_embd "
                  f"{mix['token_embd']}, output {mix['output'] or '(tied)'}")
        if mix["fallbacks"]:
            t.add_row("GGUF mix fallbacks", f"{len(mix['fallbacks'])} layers "
                      "(model.lowbit_report.gguf_mix)")
    t.add_row("excluded", str(len(report.excluded)))
    if getattr(report, "routers", None):
        t.add_row("MoE routers kept float", str(len(report.routers)))
    if report.coverage is not None:
        t.add_row("weights quantized", f"{report.coverage.quantized / report.coverage.total:.1%}")
    t.add_row("weight memory before", f"{before['bytes'] / 1e6:.1f} MB")
    t.add_row("weight memory after", f"{after['bytes'] / 1e6:.1f} MB "
              f"({after['bits_per_weight']:.2f} bits/weight)")
    if auto_report is not None:
        t.add_row("auto: budget / searched layers",
                  f"{auto_report['target_bits']:g} / {auto_report['effective_bits']:.3f} "
                  "bits per weight")
        t.add_row("auto: mix (layers)", ", ".join(f"{k} {v}" for k, v in
                                                   auto_report["counts"].items()))
        t.add_row("auto: predicted loss", f"+{auto_report['predicted_loss_increase']:.4f} "
                  "nats/token")
        t.add_row("auto: recipe", str(out / "auto_recipe.yaml"))
    if comm.enabled:
        t.add_row("processes", str(comm.world_size))
    t.add_row("time", f"{time.perf_counter() - t0:.1f} s")
    console.print(t)
    for line in report.lines():
        console.print(f"note: {line}", highlight=False, soft_wrap=True)


def _auto_recipe(m, ids, target: float, candidates: str, over: dict):
    """The --auto recipe: sensitivities on the calibration windows, then the knapsack."""
    from lowbit.data import forward_loop_from_batches
    from lowbit.search import auto_recipe

    cands = [c.strip() for c in candidates.split(",") if c.strip()]
    if not cands:
        fail("--candidates is empty; expected e.g. " + AUTO_CANDIDATES)
    args = {"group_size": over["group_size"]} if "group_size" in over else {}
    with console.status("measuring per-layer sensitivity") as st:
        def say(msg: str) -> None:
            st.update(f"sensitivity: {msg}")
        rec, rep = auto_recipe(m, cands, target, forward_loop_from_batches(ids),
                               progress=say, **args)
    if "kv_cache" in over:
        from lowbit import recipes

        rec = recipes.load(rec, kv_cache=over["kv_cache"])
    console.print(f"auto: {rep['effective_bits']:.3f} bits per weight over "
                  f"{rep['layers']} layers: " + ", ".join(f"{k} {v}" for k, v in
                                                          rep["counts"].items()))
    return rec, rep


def _quantize_stream(model, rec, out, calib, samples, seq_len, force, resume, comm,
                         chunk_size) -> None:
    import json

    from lowbit.pipeline.stream import quantize_checkpoint

    t0 = time.perf_counter()
    with one_line_errors("quantization"):
        cfg = json.loads((Path(model) / "config.json").read_text())
        ctx = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        if ctx and seq_len > ctx:
            fail(f"--seq-len {seq_len} is beyond the model's context of {ctx} tokens")
        tok = None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model)
        except Exception:  # noqa: BLE001 - a model folder without a tokenizer
            if calib is not None:
                fail(f"{model} has no tokenizer to read --calib with")
        ids = _calib_ids(tok, calib, samples, seq_len) if calib is not None else None
        with _progress() as prog:
            task = prog.add_task(f"{rec.name}: blocks (streaming)", total=None)

            def on_block(done, total, name):
                prog.update(task, completed=done, total=total,
                            description=f"{rec.name}: {name}")

            res = quantize_checkpoint(model, rec, ids, out, overwrite=force, resume=resume,
                                      tokenizer=tok, progress=on_block, comm=comm,
                                      chunk_size=chunk_size)
    if not comm.is_main:
        return
    t = Table(title=f"{model} -> {out} (lowbit, streamed block by block)")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("blocks", str(len(res.blocks)))
    if res.resumed_from:
        t.add_row("resumed from block", str(res.resumed_from))
    t.add_row("source size", f"{res.source_bytes / 1e6:.1f} MB")
    size = sum(f.stat().st_size for f in Path(out).rglob("*.safetensors"))
    t.add_row("output weights", f"{size / 1e6:.1f} MB")
    if comm.enabled:
        t.add_row("processes", str(comm.world_size))
    t.add_row("time", f"{time.perf_counter() - t0:.1f} s")
    console.print(t)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="model folder, lowbit checkpoint or .gguf"),
    text: str = typer.Option(..., "--text", help="text file to score, or sample:austen_pp"),
    baseline: Optional[str] = typer.Option(None, help="baseline model to compare with"),
    seq_len: int = typer.Option(512, help="window length (tokens)"),
    windows: int = typer.Option(32, help="number of windows"),
    stride: Optional[int] = typer.Option(None, help="stride between windows (default seq-len)"),
) -> None:
    """Perplexity on a text; with --baseline: delta, mean KL and top-1 agreement."""
    from lowbit.eval import compare, perplexity

    _check_model_path(model)
    if baseline is not None:
        _check_model_path(baseline)
    with one_line_errors("evaluation"):
        m, tok = _load(model)
        ctx = _max_ctx(m)
        if ctx and seq_len > ctx:
            fail(f"--seq-len {seq_len} is beyond the model's context of {ctx} tokens")
        ids = _text_ids(tok, text)
        if ids.numel() < seq_len:
            fail(f"{text} has {ids.numel()} tokens, fewer than one window of {seq_len}")
        if baseline is None:
            r = perplexity(m, ids, seq_len=seq_len, n_windows=windows, stride=stride)
            console.print(f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens "
                          f"({r['windows']} windows of {seq_len})")
            return
        b, _ = _load(baseline)
        r = compare(m, b, ids, seq_len=seq_len, n_windows=windows)
    t = Table(title=f"{model} vs {baseline}")
    for k in r:
        t.add_column(k, justify="right")
    t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(t)



@app.command("report")
def report_cmd(
    model: str = typer.Argument(..., help="transformers model folder, .gguf or smollm2-135m"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="preset name or YAML file"),
    text: str = typer.Option(..., "--text", help="text file for calibration and perplexity, or "
                             "sample:austen_pp"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    samples: int = typer.Option(8, help="calibration windows"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    windows: int = typer.Option(4, help="perplexity windows (from the last 20% of the text)"),
    group_size: Optional[int] = typer.Option(None, help="override the recipe's group size"),
    force: bool = typer.Option(False, help="replace --out if it exists"),
) -> None:
    """One self-contained HTML page: per-layer error, outliers, weight grid, size/perplexity."""
    import copy

    import lowbit
    from lowbit import recipes
    from lowbit.data import calibration_batches, forward_loop_from_batches, split_tokens
    from lowbit.eval import perplexity
    from lowbit.eval.footprint import weight_footprint
    from lowbit.eval.report import build_report, capture_layer_inputs, write_report

    _check_model_path(model)
    if out.exists() and not force:
        fail(f"{out} exists; pass --force to replace it")
    with one_line_errors("the report"):
        rec = recipes.load(recipe, **({"group_size": group_size} if group_size else {}))
        m, tok = _load(model)
        ctx = _max_ctx(m)
        if ctx and seq_len > ctx:
            fail(f"--seq-len {seq_len} is beyond the model's context of {ctx} tokens")
        ids = _text_ids(tok, text)
        calib_ids, eval_ids = split_tokens(ids)
        if eval_ids.numel() < seq_len or calib_ids.numel() < seq_len:
            fail(f"{text} is too short: need at least {seq_len} tokens in each of its first "
                 "80% and last 20%")
        batches = calibration_batches(tok, text_source(text, "--text"), n_samples=samples,
                                      seq_len=seq_len)
        loop = forward_loop_from_batches(batches)
        fp = copy.deepcopy(m)
        with console.status("baseline: perplexity and layer inputs"):
            p0 = perplexity(fp, eval_ids, seq_len=seq_len, n_windows=windows)
            before = weight_footprint(fp)
        with console.status(f"quantizing with {rec.name}"):
            lowbit.quantize(m, rec, forward_loop=loop)
            from lowbit.nn import disable_quantizers, enable_quantizers

            disable_quantizers(m)
            inputs = capture_layer_inputs(m, loop)  # FP activations of the smoothed model
            enable_quantizers(m)
            raw = capture_layer_inputs(fp, loop, names=list(inputs))  # original activations
        with console.status("quantized: perplexity"):
            p1 = perplexity(m, eval_ids, seq_len=seq_len, n_windows=windows)
        after = weight_footprint(m)
        summary = {
            "model": model, "recipe": rec.name,
            "layers quantized": len(m.lowbit_report.quantized),
            "weight memory": f"{before['bytes'] / 1e6:.1f} MB -> {after['bytes'] / 1e6:.1f} MB "
                             f"({after['bits_per_weight']:.2f} bits/weight)",
            "perplexity": f"{p0['ppl']:.3f} -> {p1['ppl']:.3f} "
                          f"({100 * (p1['ppl'] / p0['ppl'] - 1):+.2f}%), {p0['windows']} "
                          f"windows x {seq_len} tokens of {Path(text).name}",
            "calibration": f"{samples} x {seq_len} tokens",
        }
        with console.status("plotting"):
            page = build_report(m, inputs, summary, f"lowbit report: {rec.name}", raw)
        write_report(out, page)
    console.print(f"wrote {out} (perplexity {p0['ppl']:.2f} -> {p1['ppl']:.2f})")
