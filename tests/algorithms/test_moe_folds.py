"""SmoothQuant and AWQ across MoE blocks: the norm before the experts absorbs the scales of
every expert's gate/up, the router is compensated (its logits and the routing unchanged), the
float function is kept; DeepSeek's latent attention gets only the folds that fit."""

import pytest
import torch

import lowbit
from lowbit.adapters import get_adapter
from lowbit.adapters.experts import unfuse_experts
from lowbit.algorithms.smoothing import fold_scales
from lowbit.nn.experts import MoEExperts
from lowbit.nn.routers import find_routers
from lowbit.nn.utils import disabled, quantizers
from tests.moe_models import MOE_FAMILIES, VOCAB, build_moe

pytest.importorskip("transformers")

X = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def _run(m):
    """Logits and, per MoE experts module, the top-k expert indices it was called with."""
    idx = {}
    hs = [mod.register_forward_pre_hook(
        lambda mod, a, k, n=n: idx.__setitem__(n, (a[1] if len(a) > 1 else
                                                    k.get("top_k_index",
                                                          k.get("router_indices"))).clone()),
        with_kwargs=True) for n, mod in m.named_modules() if isinstance(mod, MoEExperts)]
    try:
        with torch.no_grad():
            return m(X).logits, idx
    finally:
        for h in hs:
            h.remove()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _moe_block(m):
    return next(b for b in m.model.layers if any(isinstance(x, MoEExperts)
                                                 for x in b.modules()))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_norm_group_reaches_every_expert_and_compensates_the_router(family):
    m = build_moe(family)
    unfuse_experts(m)
    ref, ref_idx = _run(m)
    block = _moe_block(m)
    ad = get_adapter(m)
    assert ad.name != "generic", family
    groups = ad.scale_groups(block)
    mlp = next(g for g in groups if g.prev == "post_attention_layernorm")
    n_exp = len(block.mlp.experts)
    assert sum(".experts." in n for n in mlp.linears) == 2 * n_exp  # every gate/up
    routers = {n.split("model.layers.")[1].split(".", 1)[1] for n in find_routers(m)
               if n.startswith(f"model.layers.{list(m.model.layers).index(block)}.")}
    assert set(mlp.readers) == routers
    s = torch.rand(block.mlp.experts[0].up_proj.weight.shape[1],
                   generator=torch.Generator().manual_seed(2)) * 3 + 0.2
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    fold_scales(block, mlp, s)
    out, idx = _run(m)
    assert _rel(out, ref) < 1e-5
    assert all(torch.equal(idx[n], ref_idx[n]) for n in ref_idx)
    # the same fold without the router's compensation changes the routing: the test can fail
    m.load_state_dict(saved)
    mlp.readers = []
    fold_scales(block, mlp, s)
    _, idx = _run(m)
    assert any(not torch.equal(idx[n], ref_idx[n]) for n in ref_idx)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("recipe", ["int8-smoothquant", "int4-awq"])
def test_folds_keep_float_function_and_routing(family, recipe):
    m = build_moe(family)
    unfuse_experts(m)
    ref, ref_idx = _run(m)
    router_w = {n: m.get_submodule(n).weight.clone() for n in find_routers(m)}
    kw = {"group_size": 16} if recipe.startswith("int4") else {}
    lowbit.quantize(m, recipe, calib_data=X, **kw)
    rep = m.lowbit_report
    assert rep.coverage.body_share >= 0.99, rep.coverage.line()
    assert all(not isinstance(m.get_submodule(n), lowbit.nn.QuantMixin) for n in router_w)
    out_q, _ = _run(m)
    assert torch.isfinite(out_q).all()
    with disabled(q for _, q in quantizers(m)):
        out, idx = _run(m)
    assert _rel(out, ref) < 1e-5, (family, recipe, _rel(out, ref))
    assert all(torch.equal(idx[n], ref_idx[n]) for n in ref_idx)
    # scales were folded into the norms before the experts: the routers were compensated
    assert any(not torch.equal(m.get_submodule(n).weight, w) for n, w in router_w.items())


def test_deepseek_latent_attention_gets_only_what_fits():
    for family, q in (("deepseek_v2", ["self_attn.q_proj"]), ("deepseek_v3",
                                                              ["self_attn.q_a_proj"])):
        m = build_moe(family)
        unfuse_experts(m)
        ad = get_adapter(m)
        for block in m.model.layers:
            groups = {g.prev: g for g in ad.scale_groups(block)}
            assert groups["input_layernorm"].linears == [*q, "self_attn.kv_a_proj_with_mqa"]
            assert groups["self_attn.kv_a_layernorm"].linears == ["self_attn.kv_b_proj"]
            assert ("self_attn.q_a_layernorm" in groups) == (family == "deepseek_v3")
            assert "self_attn.v_proj" not in groups  # no plain value projection
            assert all(not g.prev.startswith("self_attn") or g.prev_kind == "norm"
                       for g in groups.values())


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_scale_search_keeps_routing(family):
    """AWQ/SmoothQuant score a candidate scale on the MoE block with the experts' inputs
    scaled (the norm untouched): the router reads what it always read."""
    from lowbit import recipes
    from lowbit.algorithms.smoothing import GroupProbe
    from lowbit.nn.swap import apply_recipe

    m = build_moe(family)
    unfuse_experts(m)
    apply_recipe(m, recipes.load("int4-weight-only", group_size=16))
    block = _moe_block(m)
    g = next(g for g in get_adapter(m).scale_groups(block)
             if g.prev == "post_attention_layernorm")
    assert g.parent == "mlp"  # the router runs inside the scored module
    got = []
    h = block.mlp.register_forward_pre_hook(lambda mod, a, k: got.append((a, k)),
                                            with_kwargs=True)
    with disabled(q for _, q in quantizers(m)):
        _, ref_idx = _run(m)
    h.remove()
    probe = GroupProbe(block, g, {"mlp": got})
    idx = []
    h = block.mlp.experts.register_forward_pre_hook(lambda mod, a: idx.append(a[1].clone()))
    s = torch.rand(block.mlp.experts[0].up_proj.weight.shape[1],
                   generator=torch.Generator().manual_seed(3)) * 3 + 0.2
    probe.loss(s)
    h.remove()
    layer = list(m.model.layers).index(block)
    name = next(n for n in ref_idx if n.startswith(f"model.layers.{layer}."))
    assert len(idx) == 1 and torch.equal(idx[0], ref_idx[name])
