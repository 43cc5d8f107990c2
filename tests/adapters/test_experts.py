"""MoE experts split into per-expert linears: same function, declared layouts, refusals."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.adapters.experts import LAYOUTS, layout_of, unfuse_experts
from lowbit.errors import ConfigError
from lowbit.nn.experts import MoEExperts
from lowbit.nn.routers import find_routers
from tests.moe_models import EXTRA_MOE_FAMILIES, MOE_FAMILIES, VOCAB, build_moe

ALL = MOE_FAMILIES + EXTRA_MOE_FAMILIES

pytest.importorskip("transformers")


def _logits(m, x):
    with torch.no_grad():
        return m(x).logits


@pytest.mark.parametrize("family", ALL)
def test_split_experts_compute_the_same_function(family):
    m = build_moe(family)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _logits(m, x)
    fused = {n: {k: v.clone() for k, v in mod.named_parameters(recurse=False)}
             for n, mod in m.named_modules() if type(mod).__name__ in LAYOUTS}
    names = unfuse_experts(m)
    assert names and set(names) == set(fused)
    out = _logits(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n in names:
        mod = m.get_submodule(n)
        assert isinstance(mod, MoEExperts) and len(mod) == mod.num_experts
        # the stacked tensors come back bit for bit
        for k, v in mod.fused().items():
            assert torch.equal(v, fused[n][k]), (n, k)
        assert f"{n}.0.down_proj.weight" in dict(m.named_parameters())
    assert unfuse_experts(m) == []  # nothing left to split


def test_every_declared_layout_is_tested():
    """No experts class is declared without a tiny model of its family in these tests."""
    seen = set()
    for family in ALL:
        seen |= {type(mod).__name__ for mod in build_moe(family).modules()}
    assert set(LAYOUTS) <= seen, sorted(set(LAYOUTS) - seen)


@pytest.mark.parametrize("family", ALL)
def test_declared_layout_agrees_with_transformers(family):
    """The decorator transformers puts on its experts classes states the layout too."""
    m = build_moe(family)
    for mod in m.modules():
        if type(mod).__name__ not in LAYOUTS:
            continue
        lay = layout_of(mod)
        assert getattr(mod, "is_transposed", False) == lay.transposed
        assert getattr(mod, "is_concatenated", True) == lay.concatenated
        assert getattr(mod, "has_bias", False) == lay.bias
        assert getattr(mod, "has_gate", True) == lay.has_gate


def test_unknown_experts_class_is_refused_by_name():
    class StrangeExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 8, 8))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = StrangeExperts()
            self.gate = nn.Linear(8, 4)

    model = nn.Sequential(Block())
    with pytest.raises(ConfigError, match="StrangeExperts has no layout declared"):
        unfuse_experts(model)
    assert isinstance(model[0].experts, StrangeExperts)  # left as it was
    with pytest.raises(ConfigError, match="StrangeExperts"):
        lowbit.quantize(model, "int8-weight-only")


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("recipe", ["int4-weight-only", "int4-gptq", "fp8"])
def test_every_expert_is_quantized_routers_float(family, recipe):
    """(int4-awq and int8-smoothquant: tests/algorithms/test_moe_folds.py)"""
    m = build_moe(family)
    kw = {"group_size": 16} if recipe.startswith("int4") else {}
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    lowbit.quantize(m, recipe, calib_data=x, **kw)
    cov = m.lowbit_report.coverage
    assert cov.body_share >= 0.99, cov.line()
    routers = find_routers(m)
    assert routers  # one per MoE block (and Qwen2-MoE's shared-expert gates)
    float_params = {u.name for u in cov.unquantized if u.kind == "router"}
    for name in routers:  # every router found and left float
        assert not isinstance(m.get_submodule(name), lowbit.nn.QuantMixin)
        assert f"{name}.weight" in float_params
    n_experts = sum(1 for n in m.lowbit_report.quantized if ".experts." in n)
    assert n_experts == sum(len(e) * (3 if hasattr(e[0], "gate_proj") else 2)
                            for e in m.modules() if isinstance(e, MoEExperts))
    assert torch.isfinite(_logits(m, x)).all()


def test_expert_recipe_patterns_read_like_dense_ones():
    m = build_moe("qwen3_moe")
    recipe = {"name": "experts-down-int8", "targets": [
        {"pattern": "*.mlp.experts.*.down_proj", "weight": {"format": "int8"}}]}
    lowbit.quantize(m, recipe)
    q = m.lowbit_report.quantized
    assert q and all(n.endswith("down_proj") and ".experts." in n for n in q)
    assert len(q) == 2 * 4  # two layers, four experts each


@pytest.mark.parametrize("family", EXTRA_MOE_FAMILIES)
def test_other_declared_families_are_quantized_whole(family):
    """Families with a declared layout but no MoE adapter: experts split and quantized."""
    m = build_moe(family)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    lowbit.quantize(m, "int4-weight-only", group_size=16)
    assert m.lowbit_report.coverage.body_share >= 0.99, m.lowbit_report.coverage.line()
    assert torch.isfinite(_logits(m, x)).all()
