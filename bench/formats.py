"""Fake-quant throughput per format and granularity on a 4096x4096 float32 tensor.

GB/s of float32 input read, beside ``x.clone()`` (one read + one write of the same bytes) as
the memory-bandwidth reference. Median of --repeats runs after a warm-up. Prints a table and
writes bench/results/formats.json.

    python bench/formats.py [--size 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lowbit.core import QuantSpec, fake_quant

CASES = [
    ("int8", dict(format="int8")),
    ("int8", dict(format="int8", granularity="channel")),
    ("int8", dict(format="int8", granularity="token", dynamic=True)),
    ("int4", dict(format="int4", granularity="group", group_size=32)),
    ("int4", dict(format="int4", granularity="group", group_size=128)),
    ("int4", dict(format="int4", granularity="group", group_size=128, symmetric=False)),
    ("fp8_e4m3", dict(format="fp8_e4m3")),
    ("fp8_e4m3", dict(format="fp8_e4m3", granularity="channel")),
    ("fp8_e4m3", dict(format="fp8_e4m3", granularity="block", block=(128, 128))),
    ("fp8_e5m2", dict(format="fp8_e5m2", granularity="channel")),
    ("fp6_e3m2", dict(format="fp6_e3m2", granularity="group", group_size=32)),
    ("fp4_e2m1", dict(format="fp4_e2m1", granularity="group", group_size=32)),
    ("nvfp4", dict(format="nvfp4")),
    ("mxfp4", dict(format="mxfp4")),
    ("mxfp8_e4m3", dict(format="mxfp8_e4m3")),
]


def timeit(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "formats.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    gb = x.numel() * 4 / 1e9
    t_clone = timeit(lambda: x.clone(), args.repeats)
    rows = [{"format": "clone", "granularity": "-", "ms": t_clone * 1e3, "gbps": gb / t_clone,
             "pct_of_clone": 100.0}]
    for name, kw in CASES:
        spec = QuantSpec(**kw)
        t = timeit(lambda: fake_quant(x, spec), args.repeats)
        rows.append({"format": name, "granularity": spec.short().split(" ", 1)[1],
                     "ms": t * 1e3, "gbps": gb / t, "pct_of_clone": 100 * t_clone / t})
    print(f"fake_quant of a {args.size}x{args.size} float32 tensor, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}")
    print(f"{'format':12s} {'granularity':16s} {'ms':>8s} {'GB/s':>7s} {'% clone':>8s}")
    for r in rows:
        print(f"{r['format']:12s} {r['granularity']:16s} {r['ms']:8.1f} {r['gbps']:7.2f} "
              f"{r['pct_of_clone']:7.0f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"size": args.size, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "repeats": args.repeats}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
