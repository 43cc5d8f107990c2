"""An upcycled MoE against its dense model, quantized with the same recipes (issue 17).

The MoE is SmolLM2-135M upcycled by ``lowbit.data.upcycle_moe`` (each block's MLP copied
into 8 experts, seeded router, top-2, renormalised weights: in FP32 it computes the dense
model's function, 692M parameters). Each recipe (default int4-gptq, int4-awq,
int8-smoothquant, fp8; int4 group 64) quantizes the dense model and the MoE with the same
calibration windows (``--samples`` seeded windows of ``--seq`` tokens from the first 80% of
austen_pp.txt, seed 0) and both are scored on the same held-out windows (the first
``--windows`` non-overlapping windows of ``--seq`` tokens of the last 20%). Every row
(``dense`` or ``moe`` x ``fp32`` or a recipe) runs in its own process, so its peak RSS
(``resource.getrusage``) is its own.

Per recipe: perplexity of both, relative gap MoE vs dense, quantization wall time and time
per calibration token of both and their ratio, peak RSS; for the MoE: tokens per expert
(min/median/max over the 240 experts) from the quantize report (``model.lowbit_report.experts``,
counted by the pipeline), and also counted here with forward hooks on the routers of the FP32
MoE over the calibration windows (one pass, before quantizing); whether every expert was
calibrated (all 3 x 240 expert linears quantized, static input quantizers with a finite
amax, no expert of the report with a fallback other than statistics from all tokens
(``moe_calibrate_all_experts``) or from its own routed tokens: GPTQ's RTN fallback or a
scale borrowed from other experts count as not calibrated; the report's under-threshold
experts are counted per fallback), and the share of (token, block) top-2 choices of the quantized
MoE equal to the FP32 MoE's on the first evaluation window (``routing_agreement``; and
``routing_overlap``, the share of the chosen experts kept): routers stay float, so only the
quantization of what feeds them moves it (int4 RTN of the whole MoE keeps about 58% of the
exact pairs, measured on 512 held-out tokens). Goal (issue 17): gap <= 2%, every expert
calibrated, time per token <= 1.5x dense.

Defaults (``--samples 12 --seq 256 --windows 16 --threads 2``) are sized for about 25-30
minutes on a 2-core CPU with nothing else running (estimated from the fixed costs measured at
2 x 64 calibration tokens on a quiet machine: dense / MoE quantization int4-gptq 33 / 178 s,
int4-awq 46 / 223 s, int8-smoothquant 14 / 74 s; the MoE holds 692M parameters, peak RSS
about 6.5 GB; under CPU contention every time is several times longer). Prints a table and writes
``bench/results/moe.json`` after every row.

    python bench/moe.py [--samples 12] [--seq 256] [--windows 16] [--threads 2]
        [--recipes int4-gptq int4-awq int8-smoothquant fp8] [--out bench/results/moe.json]
    python bench/moe.py --tiny          # a tiny seeded Llama, a few tokens: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT = ["int4-gptq", "int4-awq", "int8-smoothquant", "fp8"]
GROUP = 64
NUM_EXPERTS, TOP_K = 8, 2
GOAL_GAP, GOAL_TIME = 0.02, 1.5
AGREEMENT_WINDOWS = 1


def tiny_dense(vocab: int):
    """A seeded tiny Llama (hidden 64, 2 blocks) over the real tokenizer's vocabulary."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def load(args, kind: str):
    """``(model, tokenizer)``: the dense model or its upcycled MoE (``--tiny``: a tiny seeded
    Llama over the real tokenizer, the real model not loaded)."""
    from lowbit.data import load_model, upcycle_moe

    if args.tiny:
        from transformers import AutoTokenizer

        from lowbit.data import model_dir

        tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
        dense = tiny_dense(len(tok))
    else:
        dense, tok = load_model()
    if kind == "dense":
        return dense, tok
    moe = upcycle_moe(dense, num_experts=NUM_EXPERTS, top_k=TOP_K, seed=0)
    del dense
    return moe, tok


def route(model, windows) -> tuple[list, "object"]:
    """Top-k expert sets of every (window, block) and the routed-token counts ``[blocks, E]``
    of the FP32 routers over ``windows [n, L]`` (forward hooks on the routers)."""
    import torch

    layers = model.model.layers
    counts = torch.zeros(len(layers), NUM_EXPERTS, dtype=torch.long)
    chosen: list = []

    def hook_for(i):
        def hook(mod, args, out):
            idx = out[2]
            counts[i] += torch.bincount(idx.flatten(), minlength=NUM_EXPERTS)
            chosen.append((i, idx.sort(-1).values.clone()))
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for row in windows:
                model(row.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return chosen, counts


def expert_check(model, report, recipe) -> dict:
    """Whether every expert of ``model`` (after lowbit.quantize) was calibrated: every expert
    linear quantized, every static input quantizer with a finite amax, and no expert of the
    report's ``experts`` rows (:mod:`lowbit.pipeline.moe`) with a fallback other than
    statistics from all tokens or from its own routed tokens (> 0): RTN instead of GPTQ, or
    a scale borrowed from other experts, count as not calibrated."""
    import math

    from lowbit.nn.experts import MoEExperts
    from lowbit.nn.modules import QuantMixin

    n = quantized = static = amax_ok = 0
    bad: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, MoEExperts):
            continue
        for e, ex in enumerate(m):
            for role, lin in ex.named_children():
                n += 1
                if not isinstance(lin, QuantMixin) or not lin.weight_quantizer.is_enabled:
                    bad.append(f"{name}.{e}.{role}: not quantized")
                    continue
                quantized += 1
                q = lin.input_quantizer
                if q.is_enabled and q.needs_calibration:
                    static += 1
                    if q.amax is not None and math.isfinite(float(q.amax.max())):
                        amax_ok += 1
                    else:
                        bad.append(f"{name}.{e}.{role}: input quantizer not calibrated")
    rows = getattr(report, "experts", None) or []
    fallbacks: dict[str, int] = {}
    for r in rows:
        fb = r.get("fallback")
        if fb is None:
            continue
        fallbacks[fb] = fallbacks.get(fb, 0) + 1
        own = fb.startswith("statistics from") and r["routed_tokens"] > 0
        if not (own or "all tokens" in fb):
            bad.append(f"{r['name']}: {fb}")
    return {"expert_linears": n, "quantized": quantized, "static_input_quantizers": static,
            "static_calibrated": amax_ok, "report_rows": len(rows),
            "under_min_tokens": sum(fallbacks.values()),
            "min_tokens": rows[0]["min_tokens"] if rows else None,
            "fallbacks": fallbacks,
            "calibrate_all_experts": getattr(recipe, "calibrate_all_experts", None),
            "problems": bad[:10], "n_problems": len(bad),
            "all_calibrated": bool(n and quantized == n and not bad)}


def summary(values) -> dict:
    import statistics

    v = sorted(int(x) for x in values)
    return {"min": v[0], "median": statistics.median(v), "max": v[-1], "n": len(v),
            "zero": sum(1 for x in v if x == 0)}


def child(args) -> dict:
    """One row ``kind:recipe``: load, (route), quantize, evaluate."""
    import torch

    torch.set_num_threads(args.threads)
    import lowbit
    from lowbit import recipes
    from lowbit.data import calibration_batches, forward_loop_from_batches, tokenize
    from lowbit.data.text import read_text, split_tokens
    from lowbit.eval import perplexity

    kind, recipe = args.child.split(":", 1)
    t = time.perf_counter()
    model, tok = load(args, kind)
    row = {"kind": kind, "recipe": recipe, "load_s": round(time.perf_counter() - t, 1),
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    _, ev = split_tokens(tokenize(tok, read_text(args.text), cache=True))
    first = ev[:AGREEMENT_WINDOWS * args.seq].reshape(AGREEMENT_WINDOWS, args.seq)
    calib = calibration_batches(tok, args.text, n_samples=args.samples, seq_len=args.seq,
                                seed=0, cache=True)
    if kind == "moe":
        t = time.perf_counter()
        _, counts = route(model, calib)
        fp32_choice, _ = route(model, first)
        row["route_s"] = round(time.perf_counter() - t, 1)
        row["tokens_per_expert"] = summary(counts.flatten())
        row["tokens_per_expert_source"] = ("forward hooks on the routers of the FP32 MoE, one "
                                           "pass over the calibration windows")
    if recipe != "fp32":
        r = recipes.load(recipe)
        over = {"group_size": GROUP} if recipes.takes_group_size(r) else {}
        t = time.perf_counter()
        lowbit.quantize(model, recipe, forward_loop=forward_loop_from_batches(calib), **over)
        tq = time.perf_counter() - t
        row.update(over)
        row["quant_s"] = round(tq, 2)
        row["quant_ms_per_token"] = round(1000 * tq / calib.numel(), 3)
        row["coverage"] = model.lowbit_report.coverage.line() \
            if model.lowbit_report.coverage is not None else None
        if kind == "moe":
            chk = expert_check(model, model.lowbit_report, model.lowbit_recipe)
            row["experts"] = chk
            rep_rows = getattr(model.lowbit_report, "experts", None) or []
            if rep_rows:
                row["tokens_per_expert_fp32_hooks"] = row["tokens_per_expert"]
                row["tokens_per_expert"] = summary(r["routed_tokens"] for r in rep_rows)
                row["tokens_per_expert_source"] = "quantize report (model.lowbit_report.experts)"
            q_choice, _ = route(model, first)
            same = sum(int((a[1] == b[1]).all(-1).sum()) for a, b in zip(fp32_choice, q_choice))
            kept = sum(int((a[1][:, :, None] == b[1][:, None, :]).any(-1).sum())
                       for a, b in zip(fp32_choice, q_choice))
            total = sum(a[1].shape[0] for a in fp32_choice)
            row["routing_agreement"] = round(same / total, 4)  # same top-k set
            row["routing_overlap"] = round(kept / (total * TOP_K), 4)  # top-k slots kept
            row["all_experts_calibrated"] = chk["all_calibrated"] and bool(
                rep_rows or row["tokens_per_expert"]["zero"] == 0
                or chk["calibrate_all_experts"])  # no report rows: our FP32 count decides
        row["quant_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    t = time.perf_counter()
    res = perplexity(model, ev, seq_len=args.seq, n_windows=args.windows)
    row.update(ppl=res["ppl"], eval_tokens=res["tokens"],
               eval_s=round(time.perf_counter() - t, 1))
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Per recipe: MoE vs dense (gap, time ratios, goal)."""
    by = {(r["kind"], r["recipe"]): r for r in rows}
    out = []
    for (kind, recipe), m in by.items():
        d = by.get(("dense", recipe))
        if kind != "moe" or d is None:
            continue
        c = {"recipe": recipe, "dense_ppl": d["ppl"], "moe_ppl": m["ppl"],
             "gap_rel": m["ppl"] / d["ppl"] - 1}
        if recipe != "fp32":
            c.update(time_ratio=m["quant_s"] / max(d["quant_s"], 1e-9),
                     time_per_token_ratio=m["quant_ms_per_token"]
                     / max(d["quant_ms_per_token"], 1e-9),
                     all_experts_calibrated=m["all_experts_calibrated"],
                     tokens_per_expert=m["tokens_per_expert"],
                     routing_agreement=m["routing_agreement"])
            c["goal_met"] = bool(abs(c["gap_rel"]) <= GOAL_GAP and c["all_experts_calibrated"]
                                 and c["time_per_token_ratio"] <= GOAL_TIME)
        out.append(c)
    return out


def table(rows: list[dict], cmp: list[dict], meta: dict) -> str:
    lines = [f"{meta['model']}: dense vs upcycled MoE (E={NUM_EXPERTS}, top-{TOP_K}), "
             f"{meta['threads']} thread(s); calibration {meta['samples']} x {meta['seq']} "
             f"tokens (first 80% of {meta['text']}, seed 0); ppl: last 20%, "
             f"{meta['windows']} windows x {meta['seq']}; int4 group {GROUP}"]
    head = (f"{'kind':5s} {'recipe':17s} {'ppl':>9s} {'quant s':>8s} {'ms/tok':>7s} "
            f"{'RSS MB':>7s} {'tokens/expert min/med/max':>26s} {'calib':>5s} {'route=':>6s}")
    lines += [head, "-" * len(head)]
    for r in rows:
        tpe = r.get("tokens_per_expert")
        tpe_s = f"{tpe['min']}/{tpe['median']:g}/{tpe['max']}" if tpe else ""
        cal = {True: "all", False: "NO", None: ""}[r.get("all_experts_calibrated")]
        agree = f"{100 * r['routing_agreement']:.1f}%" if "routing_agreement" in r else ""
        lines.append(f"{r['kind']:5s} {r['recipe']:17s} {r['ppl']:9.3f} "
                     f"{r.get('quant_s', 0):8.1f} {r.get('quant_ms_per_token', 0):7.2f} "
                     f"{r['peak_rss_mb']:7d} {tpe_s:>26s} {cal:>5s} {agree:>6s}")
    lines += ["", f"{'recipe':17s} {'dense ppl':>9s} {'MoE ppl':>9s} {'gap':>7s} "
              f"{'time x':>7s} {'per tok x':>9s} {'goal':>5s}"]
    for c in cmp:
        tr = f"{c['time_ratio']:7.2f}" if "time_ratio" in c else " " * 7
        tt = f"{c['time_per_token_ratio']:9.2f}" if "time_per_token_ratio" in c else " " * 9
        goal = {True: "met", False: "NOT", None: ""}[c.get("goal_met")]
        lines.append(f"{c['recipe']:17s} {c['dense_ppl']:9.3f} {c['moe_ppl']:9.3f} "
                     f"{100 * c['gap_rel']:+6.2f}% {tr} {tt} {goal:>5s}")
    lines.append(f"goal: |gap| <= {GOAL_GAP:.0%}, every expert calibrated, quantization time "
                 f"per token <= {GOAL_TIME}x dense")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (12)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per window (256)")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--text", type=Path, default=DATA / "austen_pp.txt")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default bench/results/moe.json; --tiny: "
                    "$TMPDIR/lowbit_moe_tiny.json)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny seeded Llama instead of SmolLM2-135M, 2 x 32 calibration "
                    "tokens, 2 windows of 32: checks the script end to end in seconds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    small = args.tiny
    for k, full, tiny in (("samples", 12, 2), ("seq", 256, 32), ("windows", 16, 2)):
        if getattr(args, k) is None:
            setattr(args, k, tiny if small else full)
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "lowbit_moe_tiny.json" if small
                    else Path(__file__).parent / "results" / "moe.json")
    if args.child:
        args.child_out.write_text(json.dumps(child(args)))
        return
    if not args.text.is_file():
        sys.exit(f"--text {args.text}: no such file (expected austen_pp.txt; set LOWBIT_DATA)")
    from lowbit import recipes

    for name in args.recipes:  # unknown recipes fail here, before any row runs
        recipes.load(name)
    import torch

    meta = {"model": "tiny seeded Llama (hidden 64, 2 blocks)" if small else
            "SmolLM2-135M-Instruct (FP32 = its Q4_1 GGUF, dequantized)",
            "num_experts": NUM_EXPERTS, "top_k": TOP_K, "samples": args.samples,
            "seq": args.seq, "windows": args.windows, "threads": args.threads,
            "text": args.text.name, "group_size": GROUP, "torch": torch.__version__,
            "argv": sys.argv[1:]}
    todo = [("dense", "fp32"), ("moe", "fp32")] + [(k, r) for r in args.recipes
                                                  for k in ("dense", "moe")]
    rows, failed = [], []
    t0 = time.perf_counter()
    for kind, recipe in todo:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "row.json"
            cmd = [sys.executable, __file__, "--child", f"{kind}:{recipe}", "--child-out",
                   str(out), "--samples", str(args.samples), "--seq", str(args.seq),
                   "--windows", str(args.windows), "--threads", str(args.threads),
                   "--text", str(args.text)] + (["--tiny"] if small else [])
            p = subprocess.run(cmd)
            if p.returncode != 0 or not out.is_file():
                print(f"{kind} {recipe}: failed (exit {p.returncode})", file=sys.stderr,
                      flush=True)
                failed.append(f"{kind}:{recipe}")
                continue
            row = json.loads(out.read_text())
        rows.append(row)
        print(f"{kind} {recipe}: ppl {row['ppl']:.3f}, quantize {row.get('quant_s', 0):.1f} s, "
              f"peak RSS {row['peak_rss_mb']} MB ({time.perf_counter() - t0:.0f} s so far)",
              flush=True)
        cmp = compare(rows)
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        meta["failed"] = failed
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows, "compare": cmp}, indent=2))
        tmp.replace(args.out)
    print()
    print(table(rows, compare(rows), meta))
    print(f"wrote {args.out}")
    if failed:
        sys.exit(f"failed rows: {', '.join(failed)}")


if __name__ == "__main__":
    main()
