"""Sensitivity and auto_quantize on MoE models: experts searched per block and projection
(default) or one by one, estimates from the tokens routed to each expert."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.nn.experts import MoEExperts
from lowbit.search import auto_quantize, auto_recipe, sensitivity
from tests.moe_models import VOCAB, build_moe

tf = pytest.importorskip("transformers")
CANDS = ["bf16", "int8-weight-only", "int4-weight-only"]
IDS = torch.randint(0, VOCAB, (8, 24), generator=torch.Generator().manual_seed(1))


def loop(m):
    for i in range(0, len(IDS), 4):
        m(IDS[i:i + 4])


def test_group_is_default_and_units_stay_few():
    m = build_moe("qwen3_moe")
    with torch.no_grad():
        ref = m(IDS).logits
    s = sensitivity(m, CANDS, loop, group_size=16, tokens_per_call=8)
    with torch.no_grad():  # experts split in place: the same function
        torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    assert len(s.layers) == 2 * (4 + 3)  # per block: q/k/v/o + 3 expert projections
    u = "model.layers.1.mlp.experts.*.down_proj"
    assert s.members(u) == [f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(4)]
    assert s.numel[u] == 4 * 64 * 64
    assert s.bits[u]["bf16"] == 16 * s.numel[u]
    assert s.loss[u]["int4-weight-only"] > s.loss[u]["int8-weight-only"] > 0


def test_each_expert_first_order_term_is_its_gradient():
    """Rows of an expert's linear are the tokens routed to it: with every token kept, the
    first-order estimate of each expert projection equals <dL/dW, Q(W) - W> / tokens."""
    m = build_moe("mixtral")
    s = sensitivity(m, ["int4-weight-only"], loop, group_size=16, tokens_per_call=0,
                    experts="each", store_dtype=torch.float32)
    assert len(s.layers) == 2 * (4 + 3 * 4)
    q = build_moe("mixtral")  # the same weights, quantized, for Q(W)
    import lowbit

    lowbit.quantize(q, "int4-weight-only", group_size=16)
    m.requires_grad_(False)  # only the weight under test collects a gradient
    names = [f"model.layers.{b}.mlp.experts.{e}.{r}" for b in (0, 1) for e in (0, 3)
             for r in ("gate_proj", "up_proj", "down_proj")] + ["model.layers.1.self_attn.o_proj"]
    for n in names:
        w = m.get_submodule(n).weight
        w.requires_grad_(True)
        total, count = 0.0, 0
        for i in range(0, len(IDS), 4):
            ids = IDS[i:i + 4]
            logits = m(ids).logits
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                  reduction="sum")
            nll.backward()
            count += ids[:, 1:].numel()
        w.requires_grad_(False)
        dw = q.get_submodule(n).quantized_weight().detach() - w.detach()
        want = float((w.grad.double() * dw.double()).sum()) / count
        w.grad = None
        got = s.estimates["first_order"][n]["int4-weight-only"]
        assert got == pytest.approx(want, rel=1e-3, abs=1e-7), n


def test_group_and_each_agree():
    m = build_moe("olmoe")
    g = sensitivity(m, CANDS, loop, group_size=16, tokens_per_call=0)
    e = sensitivity(m, CANDS, loop, group_size=16, tokens_per_call=0, experts="each")
    for u, members in g.groups.items():
        for c in ("int8-weight-only", "int4-weight-only"):
            # linear term: exactly the sum; squared term: the sum up to cross terms
            assert g.estimates["first_order"][u][c] == pytest.approx(
                sum(e.estimates["first_order"][x][c] for x in members), rel=1e-6, abs=1e-12)
            assert g.loss[u][c] == pytest.approx(sum(e.loss[x][c] for x in members), rel=0.3)
        assert g.bits[u] == {c: sum(e.bits[x][c] for x in members) for c in CANDS}


def test_measured_group_switches_all_experts():
    m = build_moe("qwen3_moe")
    s = sensitivity(m, ["int4-weight-only"], loop, group_size=16, method="measured")
    u = "model.layers.0.mlp.experts.*.up_proj"
    assert u in s.measured and s.loss[u]["int4-weight-only"] == s.measured[u][
        "int4-weight-only"]


def _moe64():
    cfg = tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                            moe_intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=64, num_experts_per_tok=4)
    torch.manual_seed(0)
    return tf.Qwen3MoeForCausalLM(cfg).eval()


def test_auto_quantize_64_experts_stays_tractable():
    m = _moe64()
    model, recipe = auto_quantize(m, CANDS, 6.0, loop, group_size=16, tokens_per_call=16)
    rep = model.lowbit_auto_report
    assert rep["layers"] == 2 * (4 + 3)  # not 2 * (4 + 3 * 64)
    assert abs(rep["actual_bits"] - rep["effective_bits"]) < 1e-6
    pats = [p for t in recipe.to_dict()["targets"] for p in t["pattern"]]
    assert all(p.count(".") < 8 or ".experts.*." in p for p in pats)  # no per-expert list
    assert len(pats) <= 2 * 7
    assert all(isinstance(x, MoEExperts) for x in (model.model.layers[0].mlp.experts,))
    quant = [n for n, x in model.named_modules() if n.endswith("experts.63.down_proj")]
    assert len(quant) == 2


def test_each_mode_names_experts_in_the_recipe():
    m = build_moe("qwen3_moe")
    recipe, rep = auto_recipe(m, CANDS, 6.0, loop, group_size=16, tokens_per_call=0,
                              experts="each")
    assert rep["layers"] == 2 * (4 + 3 * 4) and not rep["groups"]
    with pytest.raises(Exception, match="experts must be one of group, each"):
        sensitivity(m, CANDS, loop, experts="all")
