"""KV-cache quantization: keys/values quantized where they enter the cache; generate() works."""

import pytest
import torch

import lowbit
from lowbit.nn import TensorQuantizer
from tests.tiny_models import FAMILIES, build, calib_ids, loop_over


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_kv_cache_generates(family):
    model = build(family)
    ids = calib_ids()
    lowbit.quantize(model, "int8-dynamic", kv_cache="fp8", forward_loop=loop_over(ids))
    kv = model.lowbit_report.kv_cache
    assert len(kv) == 2, kv
    assert all(method == "attention" for _, method in kv), kv
    kqs = [q for n, q in model.named_modules()
           if isinstance(q, TensorQuantizer) and q.role == "kv_cache"]
    assert len(kqs) == 4 and all(q.amax is not None and q.amax > 0 for q in kqs)
    out = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)


def test_kv_quantization_changes_and_matches_manual_quantization():
    """With a coarse int format the K/V quantizers visibly act, and the attention sees
    exactly fake_quant(k) — checked by recomputing one layer's keys by hand."""
    model = build("llama")
    ids = calib_ids()
    ref = model(ids[:1]).logits
    lowbit.quantize(model, {"name": "kv", "targets": [],
                            "kv_cache": {"format": "int4", "granularity": "tensor"}},
                    forward_loop=loop_over(ids))
    out = model(ids[:1]).logits
    assert not torch.allclose(out, ref)
    attn = model.model.layers[0].self_attn
    seen = {}
    orig = attn.k_cache_quantizer.forward

    def spy(x):
        y = orig(x)
        seen["in"], seen["out"] = x, y
        return y

    attn.k_cache_quantizer.forward = spy
    model(ids[:1])
    spec = attn.k_cache_quantizer.spec
    expect = lowbit.fake_quant(seen["in"], spec, amax=attn.k_cache_quantizer.amax)
    assert torch.equal(seen["out"], expect)
    assert torch.unique(seen["out"]).numel() <= 16


def test_decode_with_cache_equals_full_forward():
    """Quantizing the whole cache each step == quantizing entries once (static scale)."""
    model = build("llama")
    ids = calib_ids()
    lowbit.quantize(model, {"name": "kv", "targets": [], "kv_cache": "int8"},
                    forward_loop=loop_over(ids))
    x = ids[:1, :12]
    full = model(x).logits[:, -1]
    out = model(x[:, :8], use_cache=True)
    cache = out.past_key_values
    for t in range(8, 12):
        out = model(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    assert torch.allclose(out.logits[:, -1], full, atol=1e-4)


def test_per_head_kv_scales():
    model = build("llama")
    ids = calib_ids()
    lowbit.quantize(model, {"name": "kv", "targets": [], "kv_cache":
                            {"format": "fp8_e4m3", "granularity": "channel"}},
                    forward_loop=loop_over(ids))
    q = model.model.layers[0].self_attn.k_cache_quantizer
    assert q.amax.shape == (2,)  # two KV heads
