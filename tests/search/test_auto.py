import copy

import pytest
import torch

import lowbit
from lowbit import recipes
from lowbit.errors import ConfigError
from lowbit.nn import QuantMixin
from lowbit.search import (Sensitivity, auto_quantize, auto_recipe, choose, effective_bits,
                           predicted_loss, sensitivity)
from lowbit.search.knapsack import brute_force

CANDS = ["bf16", "int8-weight-only", "int4-weight-only", "nvfp4-weight-only", "int4-awq"]


def _table(loss: dict, bits: dict, numel: dict) -> Sensitivity:
    layers = list(loss)
    cands = sorted({c for r in loss.values() for c in r})
    return Sensitivity(layers, numel, cands, loss, bits, "measured", 1.0, 0,
                       recipes={c: None for c in cands})


def test_choose_meets_budget_and_is_optimal():
    numel = {"a": 100, "b": 300, "c": 200}
    bits = {n: {"w16": 16 * k, "w8": 8 * k + 32, "w4": 4 * k + 64} for n, k in numel.items()}
    loss = {"a": {"w16": 0.0, "w8": 0.01, "w4": 0.5},
            "b": {"w16": 0.0, "w8": 0.02, "w4": 0.05},
            "c": {"w16": 0.0, "w8": 0.001, "w4": 0.3}}
    s = _table(loss, bits, numel)
    for target in (4.6, 5.0, 6.0, 8.5, 12.0, 16.0):
        ch = choose(s, target)
        assert effective_bits(s, ch) <= target
        opts = [list(bits[n]) for n in s.layers]
        best, _ = brute_force([[bits[n][c] for c in o] for n, o in zip(s.layers, opts)],
                              [[loss[n][c] for c in o] for n, o in zip(s.layers, opts)],
                              int(target * 600))
        assert predicted_loss(s, ch) == pytest.approx(best)
    assert choose(s, 5.0) == {"a": "w8", "b": "w4", "c": "w4"}   # 2960 of 3000 bits


def test_budget_that_cannot_be_met():
    s = _table({"a": {"w4": 0.1}}, {"a": {"w4": 4 * 64 + 32}}, {"a": 64})
    with pytest.raises(ConfigError, match=r"target_bits 4 cannot be met: the smallest "
                                          r"candidates give 4\.5000 bits per weight"):
        choose(s, 4.0)
    for bad in (0, -1, float("nan"), "five", None):
        with pytest.raises(ConfigError, match="target_bits must be"):
            choose(s, bad)
    with pytest.raises(ConfigError, match="not in the sensitivity table"):
        choose(s, 8.0, candidates=["w8"])


def test_recipe_reproduces_the_model(tiny_model, calib_loop, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    model, recipe = auto_quantize(tiny_model, CANDS, 5.0, calib_loop, group_size=32,
                                  tokens_per_call=16)
    rep = model.lowbit_auto_report
    assert rep["effective_bits"] <= 5.0 and rep["actual_bits"] == pytest.approx(
        rep["effective_bits"])
    assert len(rep["counts"]) >= 2                      # a real mix
    assert sum(rep["counts"].values()) == rep["layers"] == 14
    path = recipes.save(recipe, tmp_path / "auto.yaml")
    loaded = recipes.load(path)
    assert loaded.to_dict() == recipe.to_dict()
    again = lowbit.quantize(fresh, loaded, calib_loop)
    a, b = dict(model.named_modules()), dict(again.named_modules())
    for name in rep["choice"]:
        assert isinstance(a[name], QuantMixin) == isinstance(b[name], QuantMixin), name
        if isinstance(a[name], QuantMixin):
            assert a[name].weight_quantizer.spec == b[name].weight_quantizer.spec
            assert torch.equal(a[name].quantized_weight(), b[name].quantized_weight()), name
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_awq_runs_only_on_the_layers_that_chose_it(tiny_model, calib_loop):
    s = sensitivity(tiny_model, ["int8-weight-only", "int4-awq"], calib_loop, group_size=32,
                    tokens_per_call=16)
    recipe, rep = auto_recipe(tiny_model, None, 6.0, sens=s)
    awq = [n for n, c in rep["choice"].items() if c == "int4-awq"]
    assert 0 < len(awq) < 14
    steps = recipe.algorithms
    assert [st.name for st in steps] == ["awq"]
    sel = [n for n in rep["choice"] if any(lowbit.config.recipe.match(p, n)
                                           for p in steps[0].targets)]
    assert sel == awq
    # the int8 layers keep their weights untouched by AWQ's clipping
    q = lowbit.quantize(copy.deepcopy(tiny_model), recipe, calib_loop)
    for n, c in rep["choice"].items():
        m = q.get_submodule(n)
        assert (m.weight_quantizer.scale is not None) == (c == "int4-awq" and
                                                          "q_proj" not in n and
                                                          "k_proj" not in n), n


def test_auto_recipe_report_and_reuse(tiny_model, calib_loop):
    s = sensitivity(tiny_model, CANDS[:4], calib_loop, group_size=32, tokens_per_call=16)
    recipes_ = {t: auto_recipe(tiny_model, None, t, sens=s) for t in (4.6, 6.0, 12.0)}
    losses = [rep["predicted_loss_increase"] for _, rep in recipes_.values()]
    assert losses[0] >= losses[1] >= losses[2]
    r, rep = recipes_[6.0]
    assert r.name == "auto-6" and rep["effective_bits"] <= 6.0
    assert rep["uniform"]["int4-weight-only"]["bits"] == pytest.approx(5.0)   # 4 + 32/32
    assert set(rep["weight_share"]) == set(rep["counts"])
    with pytest.raises(ConfigError, match="not used when sens= is given"):
        auto_recipe(tiny_model, None, 6.0, sens=s, method="measured")
    with pytest.raises(ConfigError, match="cannot be met"):
        auto_recipe(tiny_model, None, 4.0, sens=s)
