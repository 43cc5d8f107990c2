"""Packed layers with real kernels reproduce the fake-quantized model."""

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.runtime import PackedLinear
from tests.tiny_models import build, calib_ids, loop_over

CASES = [("int8-weight-only", {}, "int8_weight_only", 1e-5),
         ("int4-weight-only", {"group_size": 32}, "int4_weight_only", 1e-5),
         ("int4-weight-only-asym", {"group_size": 32}, "int4_weight_only", 1e-5),
         ("int4-gptq", {"group_size": 32}, "int4_weight_only", 1e-5),
         # activations are re-quantized per token: a 1-ulp difference upstream can flip one
         # int8 step, so W8A8 agrees to ~1e-2 relative, not to the last bit
         ("int8-dynamic", {}, "w8a8_int8", 2e-2),
         ("fp8", {}, "reference", 0), ("nvfp4", {}, "reference", 0), ("mxfp4", {}, "reference", 0)]


@pytest.mark.parametrize("recipe,kw,kernel,tol", CASES, ids=[c[0] for c in CASES])
def test_convert_matches_fake_quant(recipe, kw, kernel, tol):
    ids = calib_ids(4, 32)
    m = build("llama")
    lowbit.quantize(m, recipe, forward_loop=loop_over(ids), **kw)
    a = m(ids[:2]).logits
    counts = rt.convert(m)
    assert counts == {kernel: 14}
    assert not any(type(x).__name__ == "QuantLinear" for x in m.modules())
    b = m(ids[:2]).logits
    err = float((a - b).abs().max() / a.abs().max())
    assert err <= tol, err
    out = m.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_packed_memory_is_packed():
    m = build("llama")
    before = rt.weight_bytes(m)
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    rt.convert(m)
    lin = m.model.layers[0].mlp.down_proj
    assert isinstance(lin, PackedLinear)
    assert lin.w_packed.numel() * lin.w_packed.element_size() == lin.in_features * \
        lin.out_features // 2
    assert rt.weight_bytes(m) < before


def test_single_linear_w8a8_matches_to_float_rounding():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(64, 32))
    lowbit.quantize(seq, "int8-dynamic")
    x = torch.randn(5, 64)
    a = seq(x)
    rt.convert(seq)
    assert torch.allclose(seq(x), a, rtol=1e-5, atol=1e-6)
