"""``lowbit.load(path, packed=True)``: a checkpoint's codes straight into packed layers."""

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.runtime import PackedLinear
from tests.tiny_models import build, calib_ids, loop_over

IDS = calib_ids(2, 16, seed=3)
CASES = [("int4-weight-only", {"group_size": 32}, "int4_weight_only", 2e-2),
         ("int4-weight-only-asym", {"group_size": 32}, "int4_weight_only", 2e-2),
         ("int8-dynamic", {}, "w8a8_int8", 2e-2),
         ("int8", {}, "w8a8_int8", 2e-2),  # static activation amax fused at load
         ("fp8", {"kv_cache": "fp8"}, "reference", 0),
         ("nvfp4", {}, "reference", 0), ("mxfp4", {}, "reference", 0)]


def saved(tmp_path, recipe, kw, family="llama"):
    m = build(family)
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(4, 24)), **kw)
    lowbit.save(m, tmp_path / "ckpt")
    return m, tmp_path / "ckpt"


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


@pytest.mark.parametrize("recipe,kw,kernel,tol", CASES, ids=[c[0] for c in CASES])
def test_load_packed_equals_convert_after_load(recipe, kw, kernel, tol, tmp_path):
    fake, path = saved(tmp_path, recipe, kw)
    ref = lowbit.load(path)
    counts = rt.convert(ref)
    assert counts == {kernel: 14}
    packed = lowbit.load(path, packed=True)
    kernels = [m.kernel for m in packed.modules() if isinstance(m, PackedLinear)]
    assert kernels == [kernel] * 14
    assert not any(type(m).__name__ == "QuantLinear" for m in packed.modules())
    out = logits(packed)
    assert torch.equal(out, logits(ref))
    a = logits(fake)
    assert float((a - out).abs().max() / a.abs().max()) <= tol
    assert rt.weight_bytes(packed) == rt.weight_bytes(ref)
    assert packed.lowbit_recipe == fake.lowbit_recipe


def test_load_packed_reference_is_exact_and_small(tmp_path):
    fake, path = saved(tmp_path, "int4-weight-only-asym", {"group_size": 32})
    float_model = lowbit.load(path)
    packed = rt.load_packed(path, fast=False)
    assert torch.equal(logits(packed), logits(fake))
    rep = rt.memory_report(packed)
    assert rep["ratio"] == 1.0
    # 4-bit codes + a float32 scale and a 4-bit zero-point per 32 values: ~5.1 bits, not 32
    assert rep["resident"] < rt.weight_bytes(float_model) - 0.8 * sum(
        m.weight.numel() * 4 for m in float_model.modules() if hasattr(m, "weight_quantizer")
        and m.weight_quantizer.is_enabled)


def test_load_packed_with_biases(tmp_path):
    fake, path = saved(tmp_path, "int4-weight-only", {"group_size": 32}, family="qwen2")
    packed = lowbit.load(path, packed={"act_dtype": torch.float32})
    q = packed.model.layers[0].self_attn.q_proj
    assert isinstance(q, PackedLinear) and q.bias is not None
    assert torch.equal(q.bias, fake.model.layers[0].self_attn.q_proj.bias)
    a = logits(fake)
    assert float((a - logits(packed)).abs().max() / a.abs().max()) <= 1e-5


def test_load_packed_generates(tmp_path):
    _, path = saved(tmp_path, "int4-weight-only", {"group_size": 32})
    packed = lowbit.load(path, packed=True)
    out = packed.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_plain_load_unchanged_by_packed_option(tmp_path):
    fake, path = saved(tmp_path, "int8", {})
    m = lowbit.load(path, packed=False)
    assert torch.equal(logits(m), logits(fake))
    assert m.model.layers[0].self_attn.q_proj.input_quantizer.amax is not None


def test_bad_options_are_one_line_errors(tmp_path):
    from lowbit.errors import ConfigError

    _, path = saved(tmp_path, "int4-weight-only", {"group_size": 32})
    with pytest.raises(ConfigError, match="packed: unknown option 'fsat'"):
        lowbit.load(path, packed={"fsat": False})
    with pytest.raises(ConfigError, match="act_dtype 'bf16'; expected None or one of"):
        lowbit.load(path, packed={"act_dtype": "bf16"})
    with pytest.raises(ConfigError, match="act_dtype torch.int8"):
        rt.convert(build("llama"), act_dtype=torch.int8)
