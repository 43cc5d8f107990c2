"""TensorQuantizer with gguf_* weight specs: searched scales cached per weight version."""

from __future__ import annotations

import torch

import lowbit.nn.quantizer as qmod
from lowbit.core import QuantSpec, compute_scales, dequantize, fake_quant, quantize
from lowbit.nn.quantizer import TensorQuantizer


def test_weight_scales_searched_once_per_weight_version(monkeypatch):
    calls = []
    real = qmod.search_scales

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(qmod, "search_scales", counting)
    spec = QuantSpec(format="gguf_q4_k")
    q = TensorQuantizer(spec, "weight")
    w = torch.randn(8, 256)
    y1 = q(w)
    y2 = q(w)
    assert len(calls) == 1 and torch.equal(y1, y2)
    assert torch.equal(y1, fake_quant(w, spec))
    w.mul_(2.0)  # an in-place update (an optimizer step) invalidates the cache
    y3 = q(w)
    assert len(calls) == 2 and torch.equal(y3, fake_quant(w, spec))
    # fixed scales (set_fixed_scale) take precedence and reproduce quantize()
    qt = quantize(w, spec)
    q.set_fixed_scale(qt.scale, qt.zero_point, qt.global_scale)
    assert torch.equal(q(w), dequantize(qt))


def test_compute_scales_for_ggml_spec():
    spec = QuantSpec(format="gguf_q6_k")
    w = torch.randn(4, 512)
    lay, xv, s, zp, (fields, gs) = compute_scales(w, spec)
    qt = quantize(w, spec)
    assert xv.shape == (4, 32, 16) and zp is None
    assert torch.equal(lay.to_natural(s), qt.scale) and torch.equal(gs, qt.global_scale)
    assert torch.equal(fields["q"], qt.fields["q"])
