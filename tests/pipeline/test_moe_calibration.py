"""Calibration that reaches every expert: the option, routed tokens in the report, and the
stated fallback of an expert no token reached (never a "saw no data" error, never silent)."""

import pytest
import torch

import lowbit
from lowbit import recipes
from lowbit.adapters.experts import unfuse_experts
from lowbit.config.recipe import Recipe
from lowbit.errors import ConfigError
from lowbit.nn.experts import MoEExperts
from lowbit.pipeline.moe import ALL_TOKENS, GPTQ_RTN
from tests.moe_models import VOCAB, build_moe

pytest.importorskip("transformers")

X = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
DEAD = "model.layers.1.mlp.experts.3"  # the expert no token reaches in _starved()


def _starved():
    """DeepSeek-V3 whose MoE block (layer 1) never routes a token to expert 3 (its
    selection bias pushed down)."""
    m = build_moe("deepseek_v3")
    m.model.layers[1].mlp.gate.e_score_correction_bias[3] = -1e4
    return m


def _experts(m):
    return [e for e in m.modules() if isinstance(e, MoEExperts)]


def _row(m, name):
    return next(r for r in m.lowbit_report.experts if r["name"] == name)


def test_option_default_explicit_and_override():
    assert recipes.load("int4-gptq").calibrate_all_experts
    assert not recipes.load("fp8").calibrate_all_experts
    r = Recipe.parse({**recipes.load("int4-gptq").to_dict(), "moe_calibrate_all_experts": False,
                      "moe_min_tokens": 5})
    assert not r.calibrate_all_experts and r.moe_min_tokens == 5
    assert Recipe.parse(r.to_dict()) == r
    with pytest.raises(ConfigError, match="moe_min_tokens"):
        Recipe.parse({"moe_min_tokens": -1})
    m = build_moe("qwen3_moe")
    lowbit.quantize(m, "fp8", calib_data=X, moe_calibrate_all_experts=True)
    assert m.lowbit_recipe.calibrate_all_experts
    assert all(r["fallback"] in (None, ALL_TOKENS) for r in m.lowbit_report.experts)


def test_calibrate_all_only_while_calibrating():
    m = build_moe("qwen3_moe")
    unfuse_experts(m)
    lin = m.model.layers[0].mlp.experts[0].gate_proj
    seen = []
    h = lin.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[0]))
    lowbit.quantize(m, "int4-gptq", calib_data=X, group_size=16)
    assert X.numel() in seen  # some calibration pass ran every token through expert 0
    assert all(not e.calibrate_all and not e.track_tokens for e in _experts(m))
    seen.clear()
    with torch.no_grad():
        m(X)
    h.remove()
    routed = m.lowbit_report.experts[0]["routed_tokens"]
    assert seen == [routed] and routed < X.numel()  # inference: routed tokens only
    rows = m.lowbit_report.experts
    assert len(rows) == sum(len(e) for e in _experts(m))
    assert {"block", "expert", "routed_tokens"} <= set(rows[0])
    line = next(ln for ln in m.lowbit_report.lines() if ln.startswith("MoE experts"))
    n = sorted(r["routed_tokens"] for r in rows)
    assert f"min {n[0]} /" in line and f"max {n[-1]} over {len(rows)} experts" in line


def test_unreached_expert_static_scale_from_its_block():
    m = _starved()
    lowbit.quantize(m, "fp8", calib_data=X)  # no algorithm steps: calibrate_all off
    assert _row(m, DEAD)["routed_tokens"] == 0
    ex = m.model.layers[1].mlp.experts
    for proj in ("gate_proj", "up_proj", "down_proj"):
        others = [getattr(ex[j], proj).input_quantizer.amax for j in range(3)]
        assert torch.equal(getattr(ex[3], proj).input_quantizer.amax,
                           torch.stack(others).amax(0))
    assert "largest amax of the other experts" in _row(m, DEAD)["fallback"]
    assert any(DEAD in ln and "largest amax" in ln for ln in m.lowbit_report.lines())
    assert torch.isfinite(m(X).logits).all()


def test_unreached_expert_gptq_all_tokens_or_rtn():
    m = _starved()
    lowbit.quantize(m, "int4-gptq", calib_data=X, group_size=16)
    assert _row(m, DEAD)["fallback"] == ALL_TOKENS
    assert any(DEAD in ln and ALL_TOKENS in ln for ln in m.lowbit_report.lines())
    loss = m.lowbit_report.blocks[1]["gptq_loss"]
    assert "mlp.experts.3.down_proj" in loss  # a Hessian from every token

    m = _starved()
    w = m.model.layers[1].mlp.experts.down_proj[3].clone()
    lowbit.quantize(m, "int4-gptq", calib_data=X, group_size=16,
                    moe_calibrate_all_experts=False)
    assert GPTQ_RTN in _row(m, DEAD)["fallback"]
    assert any(DEAD in ln and GPTQ_RTN in ln for ln in m.lowbit_report.lines())
    assert "mlp.experts.3.down_proj" in m.lowbit_report.blocks[1]["gptq_rtn"]
    assert torch.equal(m.model.layers[1].mlp.experts[3].down_proj.weight, w)  # RTN of it
