"""Bytes on disk per parameter of lowbit's exports vs the theoretical minimum.

For the real model (SmolLM2-135M, ``lowbit.data.load_model()``) and each recipe (int4 g64
symmetric and asymmetric, W8A8 int8, FP8, NVFP4), the model is quantized (static recipes are
calibrated on 4 windows of 128 tokens of the standard-library demo text; the weights do not
depend on it) and exported as a native lowbit checkpoint and as compressed-tensors. For the
quantized weights, the bytes of their tensors on disk (codes + scales + zero-points + global
scales + compressed-tensors' ``weight_shape``, read from the safetensors headers) are compared
with the theoretical minimum: ``bits`` per value + ``scale bits`` per scale (+ ``bits`` per
zero-point, + 32 per NVFP4 global scale). The whole folder (embeddings, norms, config,
headers) is reported per parameter of the model too. Prints a table and writes
``bench/results/export_size.json``.

    python bench/export_size.py [--recipes int4-g64 int4-g64-asym int8 fp8 nvfp4]

Runs at low priority (nice 10): it shares the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {  # label -> (preset, overrides)
    "int4-g64": ("int4-weight-only", {"group_size": 64}),
    "int4-g64-asym": ("int4-weight-only-asym", {"group_size": 64}),
    "int8": ("int8", {}),
    "fp8": ("fp8", {}),
    "nvfp4": ("nvfp4", {}),
}
# suffixes of the tensors that hold a quantized weight, per format
WEIGHT_KEYS = {
    "lowbit": (".weight.codes", ".weight.scale", ".weight.zero_point", ".weight.global_scale"),
    "compressed-tensors": (".weight_packed", ".weight", ".weight_scale", ".weight_zero_point",
                           ".weight_global_scale", ".weight_shape"),
}
OUT = Path(__file__).resolve().parent / "results" / "export_size.json"


def header_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor of a safetensors file, from its header (nothing else is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


def theoretical_bits(model) -> tuple[int, float]:
    """(quantized weight values, minimum bits to store them with their scales)."""
    from lowbit.export import quantized_modules
    from lowbit.core import Layout

    n_vals = 0
    bits = 0.0
    for _, m in quantized_modules(model):
        q = m.weight_quantizer
        if not q.is_enabled:
            continue
        spec = q.spec
        shape = tuple(m.weight_2d().shape)
        n = shape[0] * shape[1]
        n_scales = 1
        for d in Layout(spec, shape).natural_shape():
            n_scales *= d
        n_vals += n
        bits += n * spec.bits + n_scales * spec.scale_bits()
        if not spec.symmetric:
            bits += n_scales * spec.bits
        bf = spec.block_format
        if bf is not None and bf.global_scale:
            bits += 32
    return n_vals, bits


def measure(folder: Path, fmt: str, qnames: list[str]) -> dict:
    sizes: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        sizes.update(header_sizes(f))
    wbytes = 0
    for k, b in sizes.items():
        mod = next((n for n in qnames if k.startswith(n + ".")), None)
        if mod is not None and k[len(mod):] in WEIGHT_KEYS[fmt]:
            wbytes += b
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"weight_bytes": wbytes, "folder_bytes": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    args = ap.parse_args()
    os.nice(10)
    import warnings

    import torch

    import lowbit
    from lowbit.data import default_demo_text, load_model, tokenize, windows_from_ids
    from lowbit.export import quantized_modules

    warnings.simplefilter("ignore")
    rows = []
    model, tok = load_model()
    ids = windows_from_ids(tokenize(tok, default_demo_text(50_000)), 4, 128)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    del model
    for label in args.recipes:
        preset, kw = RECIPES[label]
        model, _ = load_model()
        t = time.perf_counter()
        lowbit.quantize(model, preset, calib_data=ids, **kw)
        tq = time.perf_counter() - t
        n_vals, min_bits = theoretical_bits(model)
        qnames = [n for n, m in quantized_modules(model) if m.weight_quantizer.is_enabled]
        row = {"recipe": label, "preset": preset, **kw, "model_params": n_params,
               "quantized_values": n_vals, "min_bits_per_value": min_bits / n_vals,
               "quantize_s": round(tq, 1)}
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
            for fmt in ("lowbit", "compressed-tensors"):
                out = Path(d) / fmt
                t = time.perf_counter()
                lowbit.save(model, out, format=fmt)
                te = time.perf_counter() - t
                r = measure(out, fmt, qnames)
                key = "native" if fmt == "lowbit" else "ct"
                row[f"{key}_bits_per_value"] = r["weight_bytes"] * 8 / n_vals
                row[f"{key}_vs_min_pct"] = 100 * (r["weight_bytes"] * 8 / min_bits - 1)
                row[f"{key}_folder_bytes_per_param"] = r["folder_bytes"] / n_params
                row[f"{key}_export_s"] = round(te, 1)
        rows.append(row)
        print(f"{label:14s} min {row['min_bits_per_value']:.4f} b/v | native "
              f"{row['native_bits_per_value']:.4f} ({row['native_vs_min_pct']:+.2f}%) | "
              f"compressed-tensors {row['ct_bits_per_value']:.4f} "
              f"({row['ct_vs_min_pct']:+.2f}%)", flush=True)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print()
    print("| recipe | min bits/value | native bits/value | vs min | compressed-tensors "
          "bits/value | vs min | native folder B/param | c-t folder B/param |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['min_bits_per_value']:.4f} | "
              f"{r['native_bits_per_value']:.4f} | {r['native_vs_min_pct']:+.2f}% | "
              f"{r['ct_bits_per_value']:.4f} | {r['ct_vs_min_pct']:+.2f}% | "
              f"{r['native_folder_bytes_per_param']:.3f} | {r['ct_folder_bytes_per_param']:.3f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"model": "SmolLM2-135M", "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
