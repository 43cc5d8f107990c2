"""Weight-level contest: lowbit's ggml quantizer vs ggml's own, with and without an imatrix.

The fast early signal before the full llama-perplexity bench (bench/gguf_contest.py). On the real
reference model (SmolLM2-135M-Instruct from lowbit.data.load_model) this script

1. runs calibration windows (``--calib-tokens`` tokens in windows of ``--seq-len`` from the
   first 80% of austen_pp.txt, lowbit.data.calibration_batches, seed 0) with forward hooks on
   the inputs of every decoder ``nn.Linear`` and keeps ``H = X^T X / n`` per input (q/k/v and
   gate/up share one); the imatrix is ``diag(H)`` (mean x^2 per input channel, what
   llama-imatrix computes); the covariances are kept in the temp folder for the next run
   with the same layers and token count (``--no-cache`` recomputes them);
2. for every selected linear and every ggml type that fits its width (K types and IQ4_XS need
   ``in_features % 256 == 0``, NVFP4 64, the others 32) quantizes the weight four ways:

   * ``ggml``: ggml's own ``ggml_quantize_chunk`` (libggml-base.so from llama.cpp's build,
     through ctypes) without an imatrix; ``ggml+imatrix``: with ``quant_weights = imatrix``;
     the bytes are read back with lowbit.formats.ggml_blocks (unpack + dequantize);
   * ``lowbit``: lowbit.core.ggml.quantize_fields(w, type) (llama.cpp's data-free weighting);
     ``lowbit+imatrix``: with ``importance = imatrix``; dequantized the same way;

3. measures, summed over the selected layers per type:

   * ``weighted``: ``sum_o sum_i imp_i (w - w_hat)^2`` (the objective both minimise);
   * ``plain``: ``sum (w - w_hat)^2``;
   * ``output``: ``trace(dW H dW^T)`` = the mean squared output error of the linear over
     the calibration tokens (full covariance H, whose diagonal is the imatrix);

   and the ratios of each row to ``ggml+imatrix``, plus lowbit/ggml within each setting.

Weights are the model's float32 weights, which are themselves dequantized from a Q4_1 GGUF
(lowbit.data), so Q4_1/Q5_1 can get very close to zero error on them; ``--dither`` adds
+-half a Q4_1 step of seeded uniform noise per 32-block to remove that grid.

    nice -n 19 python bench/gguf_weights.py [--types Q4_K Q6_K ...] [--layers 0 15 29]
        [--calib-tokens 4096] [--dither] [--no-cache] [--out bench/results/gguf_weights.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder is sys.path[0]: a bench file named like a package would shadow it
# (bench/gguf.py once shadowed gguf; tests/bench/test_bench_names.py now refuses such names)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lowbit.core.ggml import quantize_fields  # noqa: E402
from lowbit.data import calibration_batches, load_model  # noqa: E402
from lowbit.errors import ConfigError  # noqa: E402
from lowbit.formats import ggml_blocks as gb  # noqa: E402

ROOT = _HERE.parent
DATA = Path(os.environ.get("LOWBIT_DATA", ROOT.parent / "shared" / "data"))
LLAMA_BIN = Path(os.environ.get("LOWBIT_LLAMA_BIN", ROOT.parent / "cache" / "llamacpp" /
                                "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" /
                                "bin"))
TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS",
         "NVFP4", "Q3_K", "Q2_K")
SETTINGS = ("ggml", "ggml+imatrix", "lowbit", "lowbit+imatrix")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# linears reading the same input share one covariance
SHARED = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
          "mlp.up_proj": "mlp.gate_proj"}


def _libggml():
    """libggml-base (ctypes.CDLL) from llama.cpp's build; ConfigError when it is not built."""
    path = LLAMA_BIN / "libggml-base.so"
    if not path.exists():
        raise ConfigError(f"{path} not found; build llama.cpp or set LOWBIT_LLAMA_BIN to the "
                          "folder holding libggml-base.so")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


def ggml_quantize(lib, name: str, w: np.ndarray, imatrix: np.ndarray | None) -> dict:
    """Fields of float32 ``w [O, I]`` quantized by ggml's ``ggml_quantize_chunk`` as ``name``.

    ``imatrix``: ``[I]`` float32 quant_weights or None. Read back with ggml_blocks.unpack.
    """
    b = gb.block(name)
    w = np.ascontiguousarray(w, dtype=np.float32)
    n_rows, n_cols = w.shape
    out = np.zeros((n_rows, n_cols // b.super * b.type_size), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    n = lib.ggml_quantize_chunk(b.ggml_type, w.ctypes.data, out.ctypes.data, 0, n_rows, n_cols,
                                None if im is None else im.ctypes.data)
    if n != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk({name}) wrote {n} bytes, expected {out.nbytes}")
    return gb.unpack(name, out, n_cols)


class _Stop(Exception):
    """Raised by a hook to end a calibration pass after the last selected layer."""


def covariances(model, tok, layers: list[int], n_tokens: int, seq_len: int,
                linears=LINEARS) -> dict:
    """``{module name: H [I, I] float64}`` = mean ``x x^T`` of each selected linear's input.

    ``linears``: the module names under a layer (``LINEARS``) whose inputs are needed.
    """
    need = {SHARED.get(lin, lin) for lin in linears}
    if n_tokens < seq_len or n_tokens % seq_len:
        raise ConfigError(f"--calib-tokens {n_tokens} must be a positive multiple of "
                          f"--seq-len {seq_len}")
    batches = calibration_batches(tok, DATA / "austen_pp.txt", n_samples=n_tokens // seq_len,
                                  seq_len=seq_len, seed=0)
    sums, counts, hooks = {}, {}, []
    for li in layers:
        for lin in LINEARS:
            if lin not in need:
                continue
            name = f"model.layers.{li}.{lin}"
            mod = model.get_submodule(name)

            def hook(m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    # stop each pass after the last selected layer (and never run the LM head)
    last = model.get_submodule(f"model.layers.{max(layers)}")

    def stop(m, args, out):
        raise _Stop

    hooks.append(last.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for row in batches:
                try:
                    model.model(row.view(1, -1))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    cov = {k: sums[k] / counts[k] for k in sums}
    for li in layers:
        for lin, src in SHARED.items():
            if src in need:
                cov[f"model.layers.{li}.{lin}"] = cov[f"model.layers.{li}.{src}"]
    return cov


def errors(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> dict:
    """``weighted`` / ``plain`` / ``output`` squared errors of ``w_hat`` vs ``w [O, I]``."""
    d = (w_hat.double() - w.double())
    imp = torch.diagonal(h)
    return {"weighted": float((d * d * imp).sum()), "plain": float((d * d).sum()),
            "output": float(((d @ h) * d).sum())}


def _core_hash() -> str:
    """sha256 (12 hex) of lowbit/core/ggml*.py as run: which quantizer version was measured."""
    import hashlib

    import lowbit.core.ggml as mod

    h = hashlib.sha256()
    for f in sorted(Path(mod.__file__).parent.glob("ggml*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def dither(w: torch.Tensor, seed: int) -> torch.Tensor:
    """``w [O, I]`` plus uniform noise of +-half the Q4_1 step of each 32-column block.

    The reference model's linears are dequantized Q4_1 (every 32-block sits on a 16-level
    grid, step ``(max - min)/15``), which favours types whose grid holds that one (Q5_1
    exactly, Q4_K/Q5_K nearly). Dithering by the grid's own rounding error gives weights
    with no grid and the same spread, closer to the original float checkpoint.
    """
    o, i = w.shape
    b = w.reshape(o, i // 32, 32)
    step = (b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)) / 15
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(b.shape, generator=g) - 0.5) * step
    return (b + noise).reshape(o, i)


CORE_SHA = _core_hash()  # at import: the code this process runs


def fits(name: str, n_cols: int) -> bool:
    """True when ggml type ``name`` can hold rows of ``n_cols`` values."""
    return n_cols % gb.block(name).super == 0


def summary(results: dict) -> str:
    """One line per type: lowbit/ggml error ratios without and with the imatrix."""
    lines = [f"{'type':7s} {'n':>3s} | no imatrix: {'weighted':>8s} {'plain':>6s} {'output':>6s} "
             f"| imatrix: {'weighted':>8s} {'plain':>6s} {'output':>6s}"]
    for t, r in results.items():
        a, b = r["lowbit_vs_ggml"]["no_imatrix"], r["lowbit_vs_ggml"]["imatrix"]

        def f(v, n):
            return f"{'-' if v is None else f'{v:.3f}':>{n}s}"
        lines.append(f"{t:7s} {r['n_linears']:3d} | {'':11s} {f(a['weighted'], 8)} "
                     f"{f(a['plain'], 6)} {f(a['output'], 6)} | {'':8s} {f(b['weighted'], 8)} "
                     f"{f(b['plain'], 6)} {f(b['output'], 6)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=list(TYPES))
    ap.add_argument("--layers", nargs="*", type=int, default=[0, 15, 29],
                    help="decoder layer indices (default 0 15 29)")
    ap.add_argument("--linears", nargs="*", default=list(LINEARS))
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dither", action="store_true",
                    help="add +-half a Q4_1 step of uniform noise to the weights (they are "
                         "dequantized Q4_1), see dither()")
    ap.add_argument("--no-cache", action="store_true",
                    help="recompute the covariances (else reused from the temp folder)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default bench/results/gguf_weights.json, "
                         "gguf_weights_dither.json with --dither)")
    args = ap.parse_args()
    if args.out is None:
        args.out = _HERE / "results" / ("gguf_weights_dither.json" if args.dither
                                        else "gguf_weights.json")
    for t in args.types:
        if t not in gb.GGML_BLOCKS:
            raise SystemExit(f"unknown type {t!r}; expected some of: {', '.join(gb.GGML_BLOCKS)}")
    for lin in args.linears:
        if lin not in LINEARS:
            raise SystemExit(f"unknown linear {lin!r}; expected some of: {', '.join(LINEARS)}")
    torch.set_num_threads(os.cpu_count() or 1)
    lib = _libggml()

    model, tok = load_model()
    n_layers = model.config.num_hidden_layers
    bad = [li for li in args.layers if not 0 <= li < n_layers]
    if bad:
        raise SystemExit(f"--layers {bad} out of range; the model has {n_layers} layers")
    t0 = time.perf_counter()
    lins = sorted({SHARED.get(lin, lin) for lin in args.linears})
    key = (f"L{'-'.join(map(str, sorted(set(args.layers))))}_T{args.calib_tokens}"
           f"_S{args.seq_len}_{'-'.join(x.split('.')[-1] for x in lins)}")
    cache = Path(tempfile.gettempdir()) / "lowbit_gguf_weights" / f"cov_{key}.pt"
    if cache.is_file() and not args.no_cache:
        cov = torch.load(cache)
    else:
        cov = covariances(model, tok, sorted(set(args.layers)), args.calib_tokens,
                          args.seq_len, args.linears)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cov, cache)
    calib_s = time.perf_counter() - t0
    print(f"covariances of {len(cov)} linears over {args.calib_tokens} tokens: {calib_s:.1f}s",
          flush=True)

    results = {}
    for tname in args.types:
        agg = {s: {"weighted": 0.0, "plain": 0.0, "output": 0.0, "time_s": 0.0}
               for s in SETTINGS}
        per_layer = []
        for li in args.layers:
            for lin in args.linears:
                mname = f"model.layers.{li}.{lin}"
                w = model.get_submodule(mname).weight.detach().float()
                if args.dither:
                    w = dither(w, seed=li * 100 + args.linears.index(lin))
                if not fits(tname, w.shape[1]):
                    continue
                h = cov[mname]
                imp = torch.diagonal(h).float()
                row = {"module": mname, "shape": list(w.shape)}
                for s in SETTINGS:
                    use_im = s.endswith("+imatrix")
                    t = time.perf_counter()
                    if s.startswith("ggml"):
                        f = ggml_quantize(lib, tname, w.numpy(),
                                          imp.numpy() if use_im else None)
                    else:
                        f = quantize_fields(w, tname, imp if use_im else None)
                    dt = time.perf_counter() - t
                    e = errors(w, gb.dequantize(tname, f), h)
                    row[s] = e
                    for k, v in e.items():
                        agg[s][k] += v
                    agg[s]["time_s"] += dt
                per_layer.append(row)
        if not per_layer:
            print(f"\n{tname}: no selected linear fits (block {gb.block(tname).super})")
            continue
        ref = agg["ggml+imatrix"]
        for s in SETTINGS:
            for k in ("weighted", "plain", "output"):
                agg[s][f"{k}_vs_ggml_imatrix"] = agg[s][k] / ref[k] if ref[k] else None
        lowbit_vs_ggml = {
            "no_imatrix": {k: agg["lowbit"][k] / agg["ggml"][k] if agg["ggml"][k] else None
                           for k in ("weighted", "plain", "output")},
            "imatrix": {k: (agg["lowbit+imatrix"][k] / ref[k] if ref[k] else None)
                        for k in ("weighted", "plain", "output")}}
        results[tname] = {"n_linears": len(per_layer), "settings": agg,
                          "lowbit_vs_ggml": lowbit_vs_ggml, "per_linear": per_layer}
        print(f"\n{tname} ({len(per_layer)} linears)")
        print(f"  {'':16s} {'weighted':>11s} {'plain':>11s} {'output':>11s} "
              f"{'w/ggml+im':>9s} {'out/ggml+im':>11s} {'time s':>7s}")
        for s in SETTINGS:
            a = agg[s]

            def r(k, a=a):
                v = a[f"{k}_vs_ggml_imatrix"]
                return "-" if v is None else f"{v:.4f}"
            print(f"  {s:16s} {a['weighted']:11.4e} {a['plain']:11.4e} {a['output']:11.4e} "
                  f"{r('weighted'):>9s} {r('output'):>11s} {a['time_s']:7.2f}", flush=True)

    out = {"model": "SmolLM2-135M-Instruct (lowbit.data.load_model, float32 from Q4_1 GGUF)",
           "layers": args.layers, "linears": args.linears, "calib_tokens": args.calib_tokens,
           "seq_len": args.seq_len, "calib_text": "austen_pp.txt first 80%, seed 0",
           "dither": args.dither, "calib_s": calib_s, "libggml": str(LLAMA_BIN / "libggml-base.so"),
           "metrics": {"weighted": "sum imatrix_i (w - w_hat)^2",
                       "plain": "sum (w - w_hat)^2",
                       "output": "trace(dW H dW^T), H = mean x x^T over calibration tokens"},
           "lowbit_core_sha256": CORE_SHA,
           "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
           "types": results}
    print("\nlowbit / ggml (< 1: lowbit has the smaller error)\n" + summary(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
