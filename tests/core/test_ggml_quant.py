"""gguf_* spec formats (lowbit.core.ggml): exactness against ggml/gguf, fixed scales, search quality."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.core import (QuantSpec, dequantize, fake_quant, fields_effective, quantize,
                         quantize_fields, round_column, search_scales)
from lowbit.core.ggml import GGML_FORMATS, ggml_type
from lowbit.errors import ConfigError, FormatError
from lowbit.formats import ggml_blocks as gb

gguf = pytest.importorskip("gguf")

TYPES = list(GGML_FORMATS.values())
_LIB = Path("/work/cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/"
            "libggml-base.so")


def _w(o=16, i=512, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(4.0)
    torch.manual_seed(seed)
    return (t.sample((o, i)) * scale).float()


def _imp(i, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(i, generator=g) ** 4 * 100 + 0.01  # skewed per-input importance


def _qtype(name):
    return getattr(gguf.GGMLQuantizationType, name)


def test_type_table_matches_ggml_blocks():
    assert set(TYPES) == set(gb.GGML_BLOCKS) - {"MXFP4"}
    for fmt, name in GGML_FORMATS.items():
        assert fmt == "gguf_" + name.lower() and ggml_type(QuantSpec(format=fmt)) == name


@pytest.mark.parametrize("name", TYPES)
def test_spec_quantize_dequantize_fake_and_gguf_exact(name):
    b = gb.GGML_BLOCKS[name]
    spec = QuantSpec(format="gguf_" + name.lower())
    assert spec.granularity == "group" and spec.group_size == b.sub and spec.axis == -1
    w = _w(8, 512 if b.super != 256 else 512)
    qt = quantize(w, spec)
    assert set(qt.fields) == set(b.field_names)
    x = dequantize(qt)
    bits = x.view(torch.int32)
    assert torch.equal(bits, fake_quant(w, spec).view(torch.int32))
    assert torch.equal(bits, gb.dequantize(name, qt.fields).view(torch.int32))
    ref = gguf.quants.dequantize(gb.pack(name, qt.fields), _qtype(name))
    ref = torch.from_numpy(np.ascontiguousarray(ref))
    assert torch.equal(x.view(torch.int32), ref.view(torch.int32))  # bits, -0.0 included
    assert qt.nbytes() == 8 * 512 // b.super * b.type_size
    # fixed scales (what set_fixed_scale stores) reproduce codes and values
    fq = fake_quant(w, spec, scale=qt.scale, zero_point=qt.zero_point,
                    global_scale=qt.global_scale)
    assert torch.equal(fq.view(torch.int32), x.view(torch.int32))
    qt2 = quantize(w, spec, scale=qt.scale, zero_point=qt.zero_point,
                   global_scale=qt.global_scale)
    for k in b.field_names:
        assert torch.equal(qt2.fields[k].to(torch.float32), qt.fields[k].to(torch.float32)), k
    # GPTQ's per-column rounding equals the fake-quantized column
    s, zp, gs = search_scales(w, name)
    assert torch.equal(s, qt.scale)
    for col in (0, b.sub + 3, 511):
        g = col // b.sub
        xc = round_column(w[:, col], s[:, g], zp[:, g] if zp is not None else None, name)
        assert torch.equal(xc.view(torch.int32), x[:, col].contiguous().view(torch.int32))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "IQ4_NL", "Q4_1"])
def test_half_precision_input_and_ste(name):
    spec = QuantSpec(format="gguf_" + name.lower())
    w = _w(4, 256).requires_grad_(True)
    y = fake_quant(w, spec)
    y.sum().backward()
    assert w.grad is not None and set(w.grad.unique().tolist()) <= {0.0, 1.0}
    assert w.grad.mean() > 0.9
    wh = w.detach().half()
    yh = fake_quant(wh, spec)
    assert yh.dtype == torch.float16
    assert torch.equal(yh, dequantize(quantize(wh, spec)))


def test_clear_errors():
    with pytest.raises(ConfigError, match="multiple of ggml's Q4_K block 256"):
        quantize(torch.randn(4, 96), QuantSpec(format="gguf_q4_k"))
    with pytest.raises(ConfigError, match="multiple of ggml's Q4_0 block 32"):
        fake_quant(torch.randn(4, 48), QuantSpec(format="gguf_q4_0"))
    with pytest.raises(ConfigError, match="sub-blocks of 32"):
        QuantSpec.parse({"format": "gguf_q4_k", "group_size": 64})
    with pytest.raises(ConfigError, match="is affine"):
        QuantSpec.parse({"format": "gguf_q4_k", "symmetric": True})
    with pytest.raises(ConfigError, match="ggml block type"):
        QuantSpec(format="gguf_q6_k").element_format  # noqa: B018
    with pytest.raises(ConfigError, match="importance has shape"):
        quantize_fields(torch.randn(4, 256), "Q4_K", torch.ones(7))
    w = _w(4, 256)
    qt = quantize(w, QuantSpec(format="gguf_q4_k"))
    with pytest.raises(FormatError, match="global_scale"):
        fake_quant(w, qt.spec, scale=qt.scale, zero_point=qt.zero_point)
    with pytest.raises(FormatError, match="not super scale"):
        fake_quant(w, qt.spec, scale=qt.scale * 1.001, zero_point=qt.zero_point,
                   global_scale=qt.global_scale)
    f0 = quantize_fields(w, "Q4_K", torch.zeros(256))  # nothing seen: uniform
    assert all(torch.equal(f0[k], v) for k, v in quantize_fields(w, "Q4_K", torch.ones(256)).items())
    with pytest.raises(FormatError, match="amax"):
        fake_quant(w, qt.spec, amax=torch.tensor(1.0))


def _werr(name, w, imp, importance):
    f = quantize_fields(w, name, importance)
    return float(((gb.dequantize(name, f) - w) ** 2 * imp).sum())


@pytest.mark.parametrize("name", ["Q4_0", "Q2_K", "Q4_K", "IQ4_XS", "NVFP4"])
def test_importance_lowers_weighted_error(name):
    w = _w(32, 512, seed=3)
    imp = _imp(512)
    with_imp = _werr(name, w, imp, imp)
    uniform = _werr(name, w, imp, torch.ones(512))
    assert with_imp < 0.95 * uniform, (with_imp, uniform)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_no_worse_than_gguf_quantizer(name):
    w = _w(64, 512, seed=5)
    ours = _werr(name, w, torch.ones(512), torch.ones(512))
    raw = gguf.quants.quantize(w.numpy(), _qtype(name))
    ref = torch.from_numpy(gguf.quants.dequantize(raw, _qtype(name)))
    theirs = float(((ref - w) ** 2).sum())
    print(f"{name}: lowbit / gguf squared error = {ours / theirs:.3f}")
    assert ours <= theirs


def _ggml_quantize(w, name, imp):
    lib = ctypes.CDLL(str(_LIB))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    qt = _qtype(name)
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // bs * ts), np.uint8)
    im = np.ascontiguousarray(imp.numpy(), dtype=np.float32) if imp is not None else None
    lib.ggml_quantize_chunk(int(qt), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                            im.ctypes.data if im is not None else None)
    return torch.from_numpy(gguf.quants.dequantize(out, qt))


@pytest.mark.skipif(not _LIB.exists(), reason="llama.cpp's libggml-base.so is not built")
@pytest.mark.parametrize("name", TYPES)
def test_no_worse_than_llama_cpp_with_imatrix(name):
    """Weighted error (imatrix weights) of lowbit's search vs ggml's own quantizer."""
    w = _w(64, 512, seed=7)
    imp = _imp(512, seed=8)
    ours = _werr(name, w, imp, imp)
    theirs = float(((_ggml_quantize(w, name, imp) - w) ** 2 * imp).sum())
    print(f"{name}: lowbit / llama.cpp weighted squared error = {ours / theirs:.3f}")
    assert ours <= theirs


def test_effective_scales_layout():
    w = _w(4, 512)
    s, zp, gs = fields_effective("Q4_K", quantize_fields(w, "Q4_K"))
    assert s.shape == (4, 16) and zp.shape == (4, 16) and gs.shape == (4, 2, 2)
    s, zp, gs = search_scales(w, "Q6_K")
    assert s.shape == (4, 32) and zp is None and gs.shape == (4, 2)
    s, zp, gs = search_scales(w, "Q4_1")
    assert s.shape == (4, 16) and zp.shape == (4, 16) and gs is None


@pytest.mark.slow
@pytest.mark.skipif(not _LIB.exists(), reason="llama.cpp's libggml-base.so is not built")
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "IQ4_NL"])
def test_real_weights_no_worse_than_llama_cpp(name):
    """SmolLM2-135M layer 3 projections, data-free: lowbit's error vs ggml's quantizer."""
    from lowbit.data import load_model

    model, _ = load_model()
    sup = gb.GGML_BLOCKS[name].super
    ws = [p.detach() for k, p in model.named_parameters()
          if ".layers.3." in k and k.endswith("proj.weight") and p.shape[1] % sup == 0]
    assert ws
    for w in ws:
        ours = float(((gb.dequantize(name, quantize_fields(w, name)) - w) ** 2).sum())
        theirs = float(((_ggml_quantize(w, name, None) - w) ** 2).sum())
        print(f"{name} {tuple(w.shape)}: lowbit / llama.cpp squared error = {ours / theirs:.3f}")
        assert ours <= theirs
