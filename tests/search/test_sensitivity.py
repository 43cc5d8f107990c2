import pytest
import torch

from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn import QuantMixin
from lowbit.search import Sensitivity, mean_loss, sensitivity, spearman
from tests.search.conftest import make_sensitive

CANDS = ["bf16", "int8-weight-only", "int4-weight-only", "nvfp4-weight-only"]


def test_sensitive_layer_ranks_highest(tiny_model, calib_loop):
    hot = make_sensitive(tiny_model)
    s = sensitivity(tiny_model, CANDS, calib_loop, group_size=32, check=["*mlp*"],
                    tokens_per_call=0)
    assert len(s.layers) == 14 and hot in s.layers
    for cand in ("int8-weight-only", "int4-weight-only"):
        est = {n: s.loss[n][cand] for n in s.layers}
        assert max(est, key=est.get) == hot, cand
        meas = {n: s.measured[n][cand] for n in s.measured}
        assert max(meas, key=meas.get) == hot, cand
    assert all(s.loss[n]["bf16"] == 0.0 for n in s.layers)


def test_fisher_agrees_with_measurement(tiny_model, calib_loop):
    s = sensitivity(tiny_model, CANDS, calib_loop, group_size=32, check=14, tokens_per_call=0)
    assert set(s.curvature) == set(s.measured) == set(s.layers)
    # the curvature term (first-order term cancelled by the mirrored measurement) is what
    # the Fisher estimate predicts
    rho = s.rank_correlation(against="curvature")
    assert rho is not None and rho > 0.85, rho
    full = sensitivity(tiny_model, CANDS[1:3], calib_loop, group_size=32, method="measured")
    assert full.method == "measured" and not full.curvature
    for n in s.layers:
        assert full.loss[n]["int4-weight-only"] == pytest.approx(
            s.measured[n]["int4-weight-only"], abs=1e-9)
    assert full.base_loss == pytest.approx(mean_loss(tiny_model, calib_loop))


def test_bits_follow_the_footprint_code(tiny_model, calib_loop):
    s = sensitivity(tiny_model, CANDS + ["mxfp4"], calib_loop, group_size=32,
                    tokens_per_call=8)
    n = "model.layers.0.mlp.down_proj"         # [64, 128]
    w = 64 * 128
    assert s.numel[n] == w
    assert s.bits[n] == {"bf16": 16 * w, "int8-weight-only": 8 * w + 64 * 32,
                         "int4-weight-only": 4 * w + (w // 32) * 32,
                         "nvfp4-weight-only": 4 * w + (w // 16) * 8 + 32,
                         "mxfp4": 4 * w + (w // 32) * 8}


def test_model_is_left_alone(tiny_model, calib_loop):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grads = [p.requires_grad for p in tiny_model.parameters()]
    sensitivity(tiny_model, ["int4-weight-only", "int4-awq"], calib_loop, group_size=32,
                tokens_per_call=16)
    assert not any(isinstance(m, QuantMixin) for m in tiny_model.modules())
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert grads == [p.requires_grad for p in tiny_model.parameters()]
    assert "forward" not in tiny_model.__dict__


def test_awq_candidate_has_its_own_pass(tiny_model, calib_loop):
    s = sensitivity(tiny_model, ["int4-weight-only", "int4-awq"], calib_loop, group_size=32,
                    check=14, tokens_per_call=0)
    assert set(s.loss[s.layers[0]]) == {"int4-weight-only", "int4-awq"}
    assert s.rank_correlation(against="curvature") > 0.85
    # AWQ (scales folded into the copy's norms, its own pass) lowers the curvature term
    assert sum(s.curvature[n]["int4-awq"] for n in s.layers) < \
        sum(s.curvature[n]["int4-weight-only"] for n in s.layers)
    assert sum(s.loss[n]["int4-awq"] for n in s.layers) < \
        sum(s.loss[n]["int4-weight-only"] for n in s.layers)


def test_round_trip_json(tiny_model, calib_loop, tmp_path):
    s = sensitivity(tiny_model, ["bf16", "int4-weight-only"], calib_loop, group_size=32,
                    check=2, tokens_per_call=8)
    t = Sensitivity.load(s.save(tmp_path / "s.json"))
    assert t.loss == s.loss and t.bits == s.bits and t.measured == s.measured
    assert t.recipes["bf16"] is None
    assert t.recipes["int4-weight-only"].to_dict() == s.recipes["int4-weight-only"].to_dict()


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        spearman([1], [1])


@pytest.mark.parametrize("kwargs,err,msg", [
    ({"method": "exact"}, ConfigError, "method must be one of"),
    ({"float_bits": 0}, ConfigError, "float_bits must be positive"),
    ({"check": ["nothing*"]}, ConfigError, "match no searched layer"),
])
def test_bad_arguments(tiny_model, calib_loop, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        sensitivity(tiny_model, ["int4-weight-only"], calib_loop, group_size=32, **kwargs)


@pytest.mark.parametrize("cands,msg", [
    (["int4-weight-only", "int4-weight-only"], "given twice"),
    (["no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    ([], "at least one candidate"),
    ("int4-weight-only", "must be a list"),
    ([{"targets": [{"pattern": "*", "weight": "int8"}], "kv_cache": "fp8"}], "kv_cache"),
    ([3], "expected a recipe name"),
])
def test_bad_candidates(tiny_model, calib_loop, cands, msg):
    with pytest.raises(ConfigError, match=msg):
        sensitivity(tiny_model, cands, calib_loop)


def test_needs_token_ids(tiny_model):
    with pytest.raises(CalibrationError, match="forward_loop"):
        sensitivity(tiny_model, ["int4-weight-only"], None, group_size=32)
    with pytest.raises(CalibrationError, match="token ids"):
        sensitivity(tiny_model, ["int4-weight-only"],
                    lambda m: m(inputs_embeds=torch.zeros(1, 4, 64)), group_size=32)


def test_gptq_candidate_swaps_its_weights_in(tiny_model, calib_loop):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    s = sensitivity(tiny_model, ["int4-weight-only", "int4-gptq"], calib_loop, group_size=32,
                    check=["*.0.mlp.*", "*.1.self_attn.o_proj"], tokens_per_call=0)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    # GPTQ's weights compensate their rounding on the calibration inputs: less curvature
    assert sum(s.curvature[n]["int4-gptq"] for n in s.curvature) < \
        sum(s.curvature[n]["int4-weight-only"] for n in s.curvature)
    assert sum(s.loss[n]["int4-gptq"] for n in s.layers) < \
        sum(s.loss[n]["int4-weight-only"] for n in s.layers)
    assert s.rank_correlation(against="curvature") > 0.8
