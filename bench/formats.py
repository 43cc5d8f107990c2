"""Fake-quant throughput per format and granularity on a 4096x4096 float32 tensor.

Throughput is GB/s of float32 input read (``numel * 4 / time``), beside ``x.clone()`` (one
read + one write of the same bytes into a fresh tensor) as the memory-bandwidth reference.
Every case is timed interleaved with clone (clone, case, clone, case, ...; warm-up first) so
that ``pct_of_clone`` compares the two under the same machine load; times are medians.
Prints a table and writes bench/results/formats.json: ``{"meta": {...}, "rows": [{format,
granularity, gbps, pct_of_clone, ms, clone_ms}, ...]}``, the first row being clone itself.

    python bench/formats.py [--size 4096] [--repeats 7] [--only int8,fp8] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lowbit.core import QuantSpec, fake_quant

# (format label, granularity label, spec keywords)
CASES = [
    ("int8", "per-tensor", dict(format="int8")),
    ("int8", "per-channel", dict(format="int8", granularity="channel")),
    ("int8", "per-token (dyn)", dict(format="int8", granularity="token", dynamic=True)),
    ("int4", "g32", dict(format="int4", granularity="group", group_size=32)),
    ("int4", "g32 asym", dict(format="int4", granularity="group", group_size=32,
                              symmetric=False)),
    ("int4", "g128", dict(format="int4", granularity="group", group_size=128)),
    ("int4", "g128 asym", dict(format="int4", granularity="group", group_size=128,
                               symmetric=False)),
    ("fp8_e4m3", "per-tensor", dict(format="fp8_e4m3")),
    ("fp8_e4m3", "per-channel", dict(format="fp8_e4m3", granularity="channel")),
    ("fp8_e4m3", "block 128x128", dict(format="fp8_e4m3", granularity="block",
                                       block=(128, 128))),
    ("fp8_e5m2", "per-channel", dict(format="fp8_e5m2", granularity="channel")),
    ("fp6_e3m2", "g32", dict(format="fp6_e3m2", granularity="group", group_size=32)),
    ("fp6_e2m3", "g32", dict(format="fp6_e2m3", granularity="group", group_size=32)),
    ("fp4_e2m1", "g32", dict(format="fp4_e2m1", granularity="group", group_size=32)),
    ("nvfp4", "g16 e4m3 + global", dict(format="nvfp4")),
    ("mxfp4", "g32 e8m0", dict(format="mxfp4")),
    ("mxfp8_e4m3", "g32 e8m0", dict(format="mxfp8_e4m3")),
]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paired(fn, ref, repeats: int) -> tuple[list[float], list[float]]:
    """Times of ``fn`` and of ``ref``, interleaved, after one warm-up call of each."""
    fn()
    ref()
    tf, tr = [], []
    for _ in range(repeats):
        tr.append(timed(ref))
        tf.append(timed(fn))
    return tf, tr


def print_table(rows: list[dict], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        print(title)
        print(f"{'format':12s} {'granularity':18s} {'ms':>8s} {'GB/s':>7s} {'% clone':>8s} "
              f"{'clone ms':>9s}")
        for r in rows:
            print(f"{r['format']:12s} {r['granularity']:18s} {r['ms']:8.1f} {r['gbps']:7.2f} "
                  f"{r['pct_of_clone']:7.0f}% {r['clone_ms']:9.1f}")
        return
    print(title)
    t = Table()
    for col in ["format", "granularity", "ms", "GB/s", "% of clone", "clone ms (paired)"]:
        t.add_column(col, justify="left" if col in ("format", "granularity") else "right")
    for r in rows:
        t.add_row(r["format"], r["granularity"], f"{r['ms']:.1f}", f"{r['gbps']:.2f}",
                  f"{r['pct_of_clone']:.0f}%", f"{r['clone_ms']:.1f}")
    Console(width=120).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="the tensor is size x size")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per case (median)")
    ap.add_argument("--only", default="", help="comma-separated substrings of format names")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "formats.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    gb = x.numel() * x.element_size() / 1e9
    only = [s for s in args.only.split(",") if s]
    cases = [c for c in CASES if not only or any(s in c[0] for s in only)]

    def clone():
        return x.clone()

    rows, clone_all = [], []
    for name, gran, kw in cases:
        spec = QuantSpec(**kw)
        tf, tr = paired(lambda: fake_quant(x, spec), clone, args.repeats)
        clone_all += tr
        t, tc = statistics.median(tf), statistics.median(tr)
        rows.append({"format": name, "granularity": gran, "spec": spec.short(),
                     "ms": t * 1e3, "gbps": gb / t, "pct_of_clone": 100 * tc / t,
                     "clone_ms": tc * 1e3})
    tc = statistics.median(clone_all) if clone_all else timed(clone)
    rows.insert(0, {"format": "clone", "granularity": "-", "spec": "x.clone()", "ms": tc * 1e3,
                    "gbps": gb / tc, "pct_of_clone": 100.0, "clone_ms": tc * 1e3})
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    title = (f"fake_quant of a {args.size}x{args.size} float32 tensor: "
             f"{torch.get_num_threads()} threads, median of {args.repeats}")
    if load:
        title += f", load average {load[0]:.1f}"
    print_table(rows, title)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"size": args.size, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "repeats": args.repeats,
            "loadavg_1m": load[0] if load else None,
            "gbps": "GB/s of float32 input read (numel * 4 bytes / median time)",
            "pct_of_clone": "median clone time / median fake_quant time, timed interleaved"}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
