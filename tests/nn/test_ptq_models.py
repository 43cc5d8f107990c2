"""lowbit.quantize on tiny transformers models of every supported family, and a CNN."""

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import recipes
from lowbit.nn import QuantMixin, TensorQuantizer
from tests.tiny_models import FAMILIES, SmallCNN, build, calib_ids, loop_over, group_over


def n_linears(model, exclude=("lm_head",)):
    from transformers.pytorch_utils import Conv1D

    return sum(1 for n, m in model.named_modules()
               if type(m) in (nn.Linear, Conv1D) and not any(e in n for e in exclude))


@pytest.mark.parametrize("preset", recipes.names())
def test_every_preset_runs_on_llama(preset):
    model = build("llama")
    n = n_linears(model)
    ids = calib_ids()
    r = recipes.load(preset, **group_over(preset, 32)) if "int4" in preset or "w4a8" in preset \
        else recipes.load(preset)
    if not r.targets and r.gguf_mix is None:  # KV-cache-only presets (kv-int4, kv-nvfp4)
        n = 0
    lowbit.quantize(model, r, forward_loop=loop_over(ids))
    assert len(model.lowbit_report.quantized) == n
    assert sum(isinstance(m, QuantMixin) for m in model.modules()) == n
    if r.kv_cache is not None:
        assert sum(hasattr(m, "k_cache_quantizer") for m in model.modules()) == 2  # 2 layers
    out = model(ids[:1]).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["int8", "fp8-dynamic", "int4-weight-only"])
def test_families(family, preset):
    model = build(family)
    ids = calib_ids()
    ref = model(ids[:1]).logits
    n = n_linears(model)
    lowbit.quantize(model, preset, forward_loop=loop_over(ids), **group_over(preset, 32))
    assert len(model.lowbit_report.quantized) == n
    out = model(ids[:1]).logits
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.5, rel


def test_bfloat16_model():
    model = build("llama", torch.bfloat16)
    ids = calib_ids()
    lowbit.quantize(model, "fp8", forward_loop=loop_over(ids))
    out = model(ids[:1]).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_int4_weight_only_at_most_16_values_per_group():
    model = build("llama")
    lowbit.quantize(model, "int4-weight-only", group_size=32)
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            w = m.quantized_weight().reshape(m.weight.shape[0], -1, 32)
            for row in w[:8]:
                for g in row:
                    assert torch.unique(g).numel() <= 16, name


def test_static_fp8_amax_is_max_seen_with_independent_hooks():
    model = build("llama")
    ids = calib_ids()
    seen = {}
    handles = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear and "lm_head" not in name:
            def hook(mod, args, name=name):
                a = args[0].detach().abs().max()
                seen[name] = torch.maximum(seen.get(name, a), a)
            handles.append(m.register_forward_pre_hook(hook))
    loop_over(ids)(model)
    for h in handles:
        h.remove()
    lowbit.quantize(model, "fp8", forward_loop=loop_over(ids))
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            assert m.input_quantizer.amax.item() == seen[name].item(), name


def test_excluded_modules_bit_identical_and_params_not_copied():
    model = build("llama")
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    head = model.lm_head.weight.detach().clone()
    hook_calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda *a: hook_calls.append(1))
    lowbit.quantize(model, "int8-dynamic")
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert keys <= set(model.state_dict())
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.lm_head.weight, head)
    ids = calib_ids()
    x = torch.randn(2, 64)
    assert torch.equal(model.lm_head(x), nn.functional.linear(x, head))
    model(ids[:1])
    assert hook_calls  # hooks registered before quantization still fire


def test_cnn():
    model = SmallCNN().eval()
    x = torch.randn(8, 3, 16, 16)
    ref = model(x)
    lowbit.quantize(model, "int8", forward_loop=lambda m: m(x))
    assert isinstance(model.conv1, QuantMixin) and isinstance(model.head, QuantMixin)
    out = model(x)
    assert 0 < (out - ref).norm() / ref.norm() < 0.05
    # per-channel weight scales are per output channel of the conv
    assert model.conv1.weight_quantizer.spec.granularity == "channel"


def test_static_recipe_without_data_is_a_clear_error():
    model = build("llama")
    with pytest.raises(lowbit.errors.CalibrationError, match="forward_loop"):
        lowbit.quantize(model, "int8")


def test_disable_enable_and_summary(capsys):
    model = build("llama")
    ids = calib_ids()
    lowbit.quantize(model, "int8", forward_loop=loop_over(ids))
    q = model(ids[:1]).logits
    n = lowbit.disable_quantizers(model, "*")
    assert n > 0
    fp = model(ids[:1]).logits
    lowbit.enable_quantizers(model, "*input_quantizer")
    rows = lowbit.print_summary(model)
    assert any(r["mode"] == "disabled" for r in rows)
    lowbit.enable_quantizers(model)
    assert torch.equal(model(ids[:1]).logits, q)
    assert not torch.equal(fp, q)
    assert "int8" in capsys.readouterr().out


def test_group_fallback_reported_and_strict_raises():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=192,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).eval()
    # an explicit group size is strict unless the fallback is asked for too (issue 16)
    lowbit.quantize(model, "int4-weight-only", group_size=64, group_policy="fallback")
    notes = model.lowbit_report.fallbacks
    assert notes and "group 64 -> 48" in notes[0]
    model = tf.LlamaForCausalLM(cfg).eval()
    with pytest.raises(lowbit.errors.ConfigError, match="not a multiple of group size 64"):
        lowbit.quantize(model, "int4-weight-only", group_size=64, group_policy="strict")


def test_already_quantized_is_rejected():
    model = build("llama")
    lowbit.quantize(model, "int8-dynamic")
    with pytest.raises(lowbit.errors.ConfigError, match="already quantized"):
        lowbit.quantize(model, "int8-dynamic")


def test_unmatched_pattern_warns_and_strict_errors():
    rec = {"name": "x", "targets": [{"pattern": "*nothing_here*", "weight": "int8"},
                                    {"pattern": "*", "weight": {"format": "int8",
                                                                "granularity": "channel"}}]}
    with pytest.warns(UserWarning, match=r"\*nothing_here\*"):
        lowbit.quantize(build("llama"), rec)
    with pytest.raises(lowbit.errors.ConfigError, match=r"\*nothing_here\*"):
        lowbit.quantize(build("llama"), {**rec, "strict": True})
