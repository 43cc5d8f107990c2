"""Real low-bit inference on the real model: memory, prefill and decode speed per variant.

SmolLM2-135M, threads = cores. Per variant: resident weight memory (MB, parameters and
buffers, tied ones once), prefill time of a 512-token prompt (median of --repeats), decode
speed (tokens/s, batch 1, --new-tokens greedy tokens after a 32-token prompt). Variants:
FP32, BF16, int8 weight-only (torch int8 weight-pack kernel), int4 weight-only g64 (torch
int4 pack kernel), W8A8 int8 (dynamic per-token activations, torch._int_mm), and the
reference dequantize-then-matmul path for int4. Prints a table and writes
bench/results/runtime.json.

    python bench/runtime.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import lowbit
import lowbit.runtime as rt
from lowbit.data import load_model


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "runtime.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base, tok = load_model()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (1, args.prefill), generator=g)
    short = prompt[:, :32]

    def variant(name):
        m = copy.deepcopy(base)
        kern = {}
        if name == "bf16":
            m = m.to(torch.bfloat16)
        elif name == "int8 weight-only":
            lowbit.quantize(m, "int8-weight-only")
            kern = rt.convert(m)
        elif name == "int4 weight-only g64":
            lowbit.quantize(m, "int4-weight-only", group_size=args.group_size)
            kern = rt.convert(m)
        elif name == "int4 g64 reference path":
            lowbit.quantize(m, "int4-weight-only", group_size=args.group_size)
            kern = rt.convert(m, fast=False)
        elif name == "w8a8 int8 dynamic":
            lowbit.quantize(m, "int8-dynamic")
            kern = rt.convert(m)
        return m.eval(), dict(kern)

    rows = []
    names = ["fp32", "bf16", "int8 weight-only", "int4 weight-only g64", "w8a8 int8 dynamic",
             "int4 g64 reference path"]
    for name in names:
        m, kern = variant(name)
        mem = rt.weight_bytes(m) / 1e6
        with torch.no_grad():
            t_pre = timed(lambda: m(prompt, use_cache=False), args.repeats)
            n = args.new_tokens

            def decode():
                m.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

            t_dec = timed(decode, max(1, args.repeats - 1))
        row = {"variant": name, "weight_mb": mem, "prefill_s": t_pre,
               "decode_tok_s": n / t_dec, "kernels": kern}
        rows.append(row)
        print(f"{name}: {mem:.1f} MB, prefill {t_pre:.3f} s, decode {n / t_dec:.2f} tok/s "
              f"{kern}", flush=True)
        del m
    fp32, bf16 = rows[0]["decode_tok_s"], rows[1]["decode_tok_s"]
    print()
    print(f"SmolLM2-135M on {torch.get_num_threads()} threads; prefill {args.prefill} tokens; "
          f"decode {args.new_tokens} tokens, batch 1, greedy")
    print(f"{'variant':26s} {'weights MB':>10s} {'prefill s':>9s} {'tok/s':>7s} "
          f"{'vs FP32':>7s} {'vs BF16':>7s}")
    for r in rows:
        print(f"{r['variant']:26s} {r['weight_mb']:10.1f} {r['prefill_s']:9.3f} "
              f"{r['decode_tok_s']:7.2f} {r['decode_tok_s'] / fp32:6.2f}x "
              f"{r['decode_tok_s'] / bf16:6.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "prefill": args.prefill, "new_tokens": args.new_tokens, "argv": sys.argv[1:]}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
