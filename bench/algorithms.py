"""RTN vs GPTQ vs AWQ (int4 g64) and W8A8 with/without SmoothQuant on the real model.

SmolLM2-135M; calibration: --samples random 512-token windows from the first 80% of
austen_pp.txt; perplexity on the last 20% (--windows windows of 512), and off-domain on the
last 20% of pydocs_tut_ref.txt (--offdomain-windows). Prints a table and writes
bench/results/algorithms.json (recipe, ppl, delta vs FP32, quantization wall time, peak RSS).

    python bench/algorithms.py [--samples 32] [--windows 32] [--recipes int4-gptq ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import calibration_batches, forward_loop_from_batches, load_model, tokenize
from lowbit.data.text import read_text, split_tokens
from lowbit.eval import perplexity

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT = ["int4-weight-only", "int4-gptq", "int4-gptq-actorder", "int4-awq", "int8",
           "int8-smoothquant"]
PEERS = {  # ../shared/PEERS.md: held-out austen, 24 windows, FP32 31.10, group 64
    "int4-weight-only": "llm-compressor RTN 40.22 (+29.3%)",
    "int4-gptq": "llm-compressor GPTQ 36.22 (+16.5%), GPTQModel 34.62 (+11.3%)",
    "int4-gptq-actorder": "GPTQModel 34.62 (+11.3%)",
    "int4-awq": "llm-compressor AWQ asym 35.11 (+12.9%), ModelOpt INT4_AWQ 37.19 (+19.6%)",
    "int8-smoothquant": "llm-compressor SQ+W8A8 31.75 (+2.1%), ModelOpt 32.52 (+4.6%)",
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--offdomain-windows", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--recipes", nargs="*", default=DEFAULT)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "algorithms.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    model, tok = load_model()
    _, ev = split_tokens(tokenize(tok, read_text(DATA / "austen_pp.txt")))
    _, off = split_tokens(tokenize(tok, read_text(DATA / "pydocs_tut_ref.txt")))
    calib = calibration_batches(tok, DATA / "austen_pp.txt", n_samples=args.samples,
                                seq_len=args.seq_len, seed=0)
    loop = forward_loop_from_batches(calib)

    def evaluate(m):
        r = perplexity(m, ev, seq_len=args.seq_len, n_windows=args.windows)["ppl"]
        o = perplexity(m, off, seq_len=args.seq_len, n_windows=args.offdomain_windows)["ppl"] \
            if args.offdomain_windows else None
        return r, o

    base, base_off = evaluate(model)
    rows = [{"recipe": "fp32", "ppl": base, "delta_pct": 0.0, "offdomain_ppl": base_off,
             "offdomain_delta_pct": 0.0, "quant_s": 0.0, "peak_rss_mb": rss_mb()}]
    print(f"fp32: {base:.3f} (off-domain {base_off:.3f})", flush=True)
    for name in args.recipes:
        m = copy.deepcopy(model)
        over = {"group_size": args.group_size} if "int4" in name or "w4a8" in name else {}
        t = time.perf_counter()
        lowbit.quantize(m, name, forward_loop=loop, **over)
        tq = time.perf_counter() - t
        p, o = evaluate(m)
        row = {"recipe": name, "ppl": p, "delta_pct": 100 * (p / base - 1), "offdomain_ppl": o,
               "offdomain_delta_pct": 100 * (o / base_off - 1) if o else None, "quant_s": tq,
               "peak_rss_mb": rss_mb(), "peer": PEERS.get(name, ""), **over}
        rows.append(row)
        print(f"{name}: {p:.3f} ({row['delta_pct']:+.2f}%), off-domain {o:.3f} "
              f"({row['offdomain_delta_pct']:+.2f}%), {tq:.0f} s", flush=True)
        del m

    print()
    print(f"SmolLM2-135M; calibration {args.samples} x {args.seq_len} tokens (austen, first 80%);"
          f" ppl: austen last 20%, {args.windows} windows x {args.seq_len}; off-domain: "
          f"pydocs last 20%, {args.offdomain_windows} windows; group {args.group_size}")
    print(f"{'recipe':20s} {'ppl':>7s} {'delta':>8s} {'off-dom':>8s} {'delta':>8s} "
          f"{'quant s':>8s} {'RSS MB':>7s}  peers (PEERS.md, 24 windows, FP32 31.10)")
    for r in rows:
        od = f"{r['offdomain_ppl']:8.2f} {r['offdomain_delta_pct']:+7.2f}%" \
            if r["offdomain_ppl"] else " " * 17
        print(f"{r['recipe']:20s} {r['ppl']:7.2f} {r['delta_pct']:+7.2f}% {od} "
              f"{r['quant_s']:8.1f} {r['peak_rss_mb']:7.0f}  {r.get('peer', '')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"samples": args.samples, "seq_len": args.seq_len, "windows": args.windows,
            "offdomain_windows": args.offdomain_windows, "group_size": args.group_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "argv": sys.argv[1:]}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
