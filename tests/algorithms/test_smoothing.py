"""SmoothQuant and AWQ folding keep the FP function; both improve the quantized error."""

import copy

import pytest
import torch

import lowbit
from lowbit.adapters import find_blocks, input_groups, linear_pairs
from lowbit.algorithms import fold_scales
from lowbit.nn import disable_quantizers
from tests.tiny_models import build, calib_ids, loop_over


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3", "qwen2"])
def test_input_groups_found_by_inspection(family):
    model = build(family)
    _, blocks = find_blocks(model)
    assert len(blocks) == 2
    seen = {}
    h = blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k),
                                            with_kwargs=True)
    model(calib_ids()[:1], use_cache=False)
    h.remove()
    groups = [g for g in input_groups(blocks[0], seen["a"], seen["k"]) if g.prev]
    assert len(groups) >= 2  # attention inputs and MLP inputs each come from a norm
    sizes = sorted(len(g.linears) for g in groups)
    assert sizes[-1] >= 2 or family == "gpt2"  # q/k/v share (GPT-2 fuses them in c_attn)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_folding_keeps_fp_outputs(family):
    model = build(family)
    ids = calib_ids()
    ref = model(ids[:2]).logits
    _, blocks = find_blocks(model)
    seen = {}
    h = blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k),
                                            with_kwargs=True)
    model(ids[:1], use_cache=False)
    h.remove()
    g = torch.Generator().manual_seed(1)
    for block in blocks:
        groups = [x for x in input_groups(block, seen["a"], seen["k"]) if x.prev]
        groups += linear_pairs(model, block)
        for grp in groups:
            n_in = block.get_submodule(grp.linears[0]).weight.shape[-1 if family != "gpt2"
                                                                     else 0]
            s = torch.rand(n_in, generator=g) * 3 + 0.2
            fold_scales(block, grp, s)
    out = model(ids[:2]).logits
    assert (out - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("recipe", ["int8-smoothquant", "int4-awq", "w4a8-awq"])
def test_algorithm_fp_function_unchanged(recipe):
    """With every quantizer disabled afterwards, the smoothed model is the FP model."""
    model = build("llama")
    ids = calib_ids(8, 32)
    ref = model(ids[:2]).logits
    lowbit.quantize(model, recipe, forward_loop=loop_over(ids), group_size=32)
    disable_quantizers(model)
    for m in model.modules():
        if hasattr(m, "invalidate_weight_cache"):
            m.invalidate_weight_cache()
    out = model(ids[:2]).logits
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_gptq_and_awq_beat_rtn_on_a_tiny_model():
    base = build("llama")
    ids = calib_ids(8, 32)
    ref = base(ids).logits
    err = {}
    for r in ["int4-weight-only", "int4-gptq", "int4-awq"]:
        m = copy.deepcopy(base)
        lowbit.quantize(m, r, forward_loop=loop_over(ids), group_size=32)
        err[r] = float((m(ids).logits - ref).norm() / ref.norm())
    assert err["int4-gptq"] < 0.85 * err["int4-weight-only"]
    assert err["int4-awq"] < 0.95 * err["int4-weight-only"]


def test_unknown_algorithm_and_argument():
    with pytest.raises(lowbit.errors.ConfigError, match="unknown algorithm 'gtpq'"):
        lowbit.quantize(build("llama"), {"targets": [{"pattern": "*", "weight": "int8"}],
                                         "algorithms": ["gtpq"]},
                        forward_loop=loop_over(calib_ids()))
    with pytest.raises(lowbit.errors.ConfigError, match="unknown argument 'damp'"):
        lowbit.quantize(build("llama"), {"targets": [{"pattern": "*", "weight": "int8"}],
                                         "algorithms": [{"name": "gptq", "args": {"damp": 1}}]},
                        forward_loop=loop_over(calib_ids()))
