"""Packed layers with real kernels reproduce the fake-quantized model."""

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.errors import ConfigError
from lowbit.runtime import PackedLinear
from lowbit.runtime.kernels import W8A8_GEMV_ROWS

W8A8_ROWS = W8A8_GEMV_ROWS - 1
from tests.tiny_models import build, calib_ids, loop_over

# the CPU weight-only kernels compute in bfloat16 (act_dtype default): ~1e-2 of the largest
# logit; W8A8 re-quantizes activations per token: a 1-ulp difference upstream can flip one
# int8 step, so it agrees to ~1e-2 too; the reference path is exact
BF16_TOL = 2e-2
CASES = [("int8-weight-only", {}, "int8_weight_only", BF16_TOL),
         ("int4-weight-only", {"group_size": 32}, "int4_weight_only", BF16_TOL),
         ("int4-weight-only-asym", {"group_size": 32}, "int4_weight_only", BF16_TOL),
         ("int4-gptq", {"group_size": 32}, "int4_weight_only", BF16_TOL),
         ("gguf-q4_0", {}, "int4_weight_only", BF16_TOL),
         ("int8-dynamic", {}, "w8a8_int8", 2e-2),
         ("int8", {}, "w8a8_int8", 2e-2),
         ("gguf-q8_0", {}, "reference", 0), ("w4a8", {"group_size": 32}, "reference", 0),
         ("fp8", {}, "reference", 0), ("fp8-dynamic", {}, "reference", 0),
         ("nvfp4", {}, "reference", 0), ("mxfp4", {}, "reference", 0),
         ("mxfp8", {}, "reference", 0)]


def quantized(recipe, kw=None, family="llama", dtype=torch.float32):
    m = build(family, dtype)
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(4, 32)), **(kw or {}))
    return m


def rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("recipe,kw,kernel,tol", CASES, ids=[c[0] for c in CASES])
def test_convert_matches_fake_quant(recipe, kw, kernel, tol):
    ids = calib_ids(4, 32)
    m = quantized(recipe, kw)
    with torch.no_grad():
        a = m(ids[:2]).logits
        counts = rt.convert(m)
        assert counts == {kernel: 14}
        assert not any(type(x).__name__ == "QuantLinear" for x in m.modules())
        b = m(ids[:2]).logits
    assert rel_err(a, b) <= tol
    out = m.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("recipe,kernel", [("int8-weight-only", "int8_weight_only"),
                                           ("int4-weight-only-asym", "int4_weight_only")])
def test_weight_only_kernels_in_float32_match_to_rounding(recipe, kernel):
    ids = calib_ids(2, 16)
    m = quantized(recipe, {"group_size": 32} if "int4" in recipe else {})
    with torch.no_grad():
        a = m(ids).logits
        assert rt.convert(m, act_dtype=torch.float32) == {kernel: 14}
        assert rel_err(a, m(ids).logits) <= 1e-5


def test_reference_path_everywhere_is_exact():
    ids = calib_ids(2, 16)
    m = quantized("int4-weight-only-asym", {"group_size": 32})
    with torch.no_grad():
        a = m(ids).logits
        assert rt.convert(m, fast=False) == {"reference": 14}
        assert torch.equal(a, m(ids).logits)


def test_bfloat16_model():
    ids = calib_ids(2, 16)
    m = quantized("int4-weight-only", {"group_size": 32}, dtype=torch.bfloat16)
    with torch.no_grad():
        a = m(ids).logits.float()
        rt.convert(m)
        b = m(ids).logits
    assert b.dtype == torch.bfloat16
    assert rel_err(a, b.float()) <= 3e-2


def test_packed_memory_is_packed():
    m = build("llama")
    before = rt.weight_bytes(m)
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    rt.convert(m)
    lin = m.model.layers[0].mlp.down_proj
    assert isinstance(lin, PackedLinear)
    assert lin.w_packed.numel() * lin.w_packed.element_size() == lin.in_features * \
        lin.out_features // 2
    # codes + one bfloat16 (scale, zero) pair per group = packed codes + float32 scales
    assert lin.resident_nbytes() == lin.packed_nbytes
    assert rt.weight_bytes(m) < before
    rep = rt.memory_report(m)
    assert rep["ratio"] == pytest.approx(1.0)
    assert rep["kernels"]["int4_weight_only"]["layers"] == 14


def test_single_linear_w8a8_matches_to_float_rounding():
    # act_dtype float32: _int_mm for every batch, exact int32 sums
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(64, 32))
    lowbit.quantize(seq, "int8-dynamic")
    x = torch.randn(5, 64)
    with torch.no_grad():
        a = seq(x)
        rt.convert(seq, act_dtype=torch.float32)
        assert seq[0].w_ones_bf16 is None
        assert torch.allclose(seq(x), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_decode_gemv_matches_int_mm(static):
    # default act_dtype (bfloat16): decode rows through the int8 GEMV on integer-valued
    # activations; the same codes as the reference, one bfloat16 rounding of the sums
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(128, 96))
    if static:
        lowbit.quantize(seq, "int8", forward_loop=lambda m: m(torch.randn(16, 128)))
    else:
        lowbit.quantize(seq, "int8-dynamic")
    x = torch.randn(W8A8_ROWS, 128) * torch.logspace(-2, 1, W8A8_ROWS)[:, None]
    with torch.no_grad():
        a = seq(x)
        rt.convert(seq)
        assert seq[0].kernel == "w8a8_int8" and seq[0].w_ones_bf16 is not None
        got = seq(x)  # fewer rows than W8A8_ROWS: the GEMV path
    err = ((got - a).abs() / a.abs().amax(-1, keepdim=True)).amax()
    assert err <= 2 ** -8, err
    # the int_mm path (a prefill batch) on the same rows gives the reference to fp32
    big = torch.cat([x, x, x])
    with torch.no_grad():
        ref_big = seq(big)[:W8A8_ROWS]
    assert torch.allclose(ref_big, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    assert not torch.equal(got, ref_big)  # the GEMV path ran (it rounds the sums)


def test_output_quantizer_layers_stay():
    from lowbit.core import QuantSpec
    from lowbit.nn import quantize_module

    lin = torch.nn.Linear(64, 32)
    quantize_module(lin, QuantSpec(format="int8", granularity="channel"),
                    output=QuantSpec(format="int8", granularity="token", dynamic=True))
    seq = torch.nn.Sequential(lin)
    assert rt.convert(seq) == {}
    assert seq[0] is lin


def test_kernel_registry():
    assert rt.kernel_names()[-1] == "reference"
    assert {"int8_weight_only", "int4_weight_only", "w8a8_int8", "fp8_scaled_mm",
            "int4_weight_only_cuda"} <= set(rt.kernel_names())
    with pytest.raises(ConfigError, match="unknown kernel 'nope'"):
        rt.get_kernel("nope")
    from lowbit.core import QuantSpec, quantize

    qt = quantize(torch.randn(32, 64), QuantSpec(format="fp8_e4m3"))
    with pytest.raises(ConfigError, match="does not support a fp8_e4m3 tensor weight"):
        PackedLinear.from_qtensor(qt, kernel="int4_weight_only")
    # fp8 has no CPU kernel; its CUDA kernel is not eligible on the CPU
    assert PackedLinear.from_qtensor(qt).kernel == "reference"


def test_cast_after_convert_keeps_codes():
    ids = calib_ids(2, 16)
    m = quantized("fp8")
    with torch.no_grad():
        rt.convert(m)
        a = m(ids).logits
        lin = m.model.layers[0].self_attn.q_proj
        assert lin.codes.dtype == torch.float8_e4m3fn
        m.to(torch.bfloat16)
        assert lin.codes.dtype == torch.float8_e4m3fn and lin.scale.dtype == torch.float32
        b = m(ids).logits
    assert b.dtype == torch.bfloat16
    assert rel_err(a, b.float()) < 5e-2


def test_weight_bytes_counts_tensor_subclasses_by_what_they_wrap():
    # torchao's quantized weights are wrapper subclasses: data_ptr() of the wrapper is not
    # where the bytes are (it once counted them as nothing)
    from torch.testing._internal.two_tensor import TwoTensor

    lin = torch.nn.Linear(8, 4, bias=False)
    a, b = torch.zeros(4, 8), torch.ones(4, 8)
    lin.weight = torch.nn.Parameter(TwoTensor(a, b), requires_grad=False)
    m = torch.nn.Sequential(lin, torch.nn.Linear(4, 2, bias=False))
    assert rt.weight_bytes(m) == 2 * (4 * 8 * 4) + 2 * 4 * 4
