"""Why a rotation helps one format and hurts another: the quantization error of SmolLM2-135M's
real linear inputs, as they are and after a Hadamard rotation, per activation format.

SmolLM2-135M (``lowbit.data.load_model()``; FP32 = its Q4_1 GGUF dequantized) reads
``--tokens`` tokens of austen's held-out 20%; the inputs of ``q_proj`` (the residual stream
after the attention norm, width 576) and ``down_proj`` (width 1536) of the layers
``--layers`` are captured with forward pre-hooks. Each input ``X [tokens, n]`` is quantized
by each format's activation spec as the presets use it (``lowbit.core.fake_quant``, dynamic
scales: the error of the format itself, not of a calibration) as is and as ``X H`` with ``H``
the ``n x n`` Hadamard matrix of ``lowbit.core.rotation`` (R1 for ``q_proj``, R4 for
``down_proj``), and with a block-diagonal Hadamard of the format's group where it has one
(MR-GPTQ). The figure is the relative error ``||Q(Y) - Y|| / ||Y||`` (rotations are
orthogonal, so ``Y``'s error equals the error the layer's output sees up to the weight).

Prints a table and writes ``--out`` (default bench/results/rotation_error.json).

    python bench/rotation_error.py [--layers 2,15,28] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
OUT = Path(__file__).parent / "results" / "rotation_error.json"
# label -> (activation spec keywords, block of the MR-GPTQ rotation or None)
FORMATS = {
    "nvfp4 (g16, e4m3 scales)": (dict(format="nvfp4", dynamic=True), 16),
    "mxfp4 (g32, e8m0 scales)": (dict(format="mxfp4", dynamic=True), 32),
    "int4 per token": (dict(format="int4", granularity="token", dynamic=True), None),
    "int8 per token": (dict(format="int8", granularity="token", dynamic=True), None),
    "fp8 e4m3 per tensor": (dict(format="fp8_e4m3", dynamic=True), None),
}


def rel_err(y: torch.Tensor, spec) -> float:
    from lowbit.core import fake_quant

    return float((fake_quant(y, spec) - y).norm() / y.norm())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,15,28")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from lowbit.core import QuantSpec
    from lowbit.core.rotation import rotation_matrix
    from lowbit.data import load_model, tokenize
    from lowbit.data.text import read_text, split_tokens

    torch.manual_seed(0)
    model, tok = load_model()
    layers = [int(s) for s in args.layers.split(",")]
    n_layers = len(model.model.layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        ap.error(f"--layers {bad}: the model has layers 0..{n_layers - 1}")
    _, ev = split_tokens(tokenize(tok, read_text(DATA / "austen_pp.txt"), cache=True))
    ids = ev[: args.tokens].reshape(1, -1)
    caps: dict[str, torch.Tensor] = {}
    hooks = []
    for i in layers:
        for mod, where in ((model.model.layers[i].self_attn.q_proj, "q_proj"),
                           (model.model.layers[i].mlp.down_proj, "down_proj")):
            def hook(m, inp, key=f"layers.{i}.{where}"):
                caps[key] = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    rows = []
    for key, x in caps.items():
        n = x.shape[-1]
        full = rotation_matrix("hadamard", n).float()
        for label, (kw, block) in FORMATS.items():
            spec = QuantSpec(**kw)
            row = {"input": key, "width": n, "format": label,
                   "amax": round(float(x.abs().max()), 2),
                   "amax_rotated": round(float((x @ full).abs().max()), 2),
                   "plain": rel_err(x, spec), "hadamard": rel_err(x @ full, spec)}
            if block:
                b = rotation_matrix("hadamard", n, block=block).float()
                row["block"] = rel_err(x @ b, spec)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": "SmolLM2-135M-Instruct (FP32 from Q4_1 GGUF)", "layers": layers,
            "tokens": int(ids.numel()), "text": "austen_pp.txt (last 20%)",
            "metric": "||Q(Y) - Y|| / ||Y||, dynamic scales"}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.replace(args.out)
    head = (f"{'input':22s} {'format':26s} {'amax':>8s} {'rot amax':>8s} {'plain':>7s} "
            f"{'Hadamard':>8s} {'block':>7s}")
    print(f"relative quantization error of real inputs, {ids.numel()} tokens")
    print(head)
    print("-" * len(head))
    for r in rows:
        blk = f"{r['block']:7.4f}" if "block" in r else ""
        print(f"{r['input']:22s} {r['format']:26s} {r['amax']:8.1f} {r['amax_rotated']:8.1f} "
              f"{r['plain']:7.4f} {r['hadamard']:8.4f} {blk:>7s}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
