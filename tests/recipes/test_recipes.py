"""Recipes: presets, YAML round trip, overrides, and one-line errors naming the problem."""

import pytest
import yaml

from lowbit import recipes
from lowbit.config import Recipe, match
from lowbit.errors import ConfigError

PRESETS = ["fp8", "fp8-dynamic", "int8", "int8-dynamic", "int4-weight-only",
           "int4-weight-only-asym", "w4a8", "nvfp4", "nvfp4-weight-only", "mxfp4", "mxfp8"]


def test_presets_present():
    assert set(PRESETS) <= set(recipes.names())


@pytest.mark.parametrize("name", PRESETS)
def test_yaml_round_trip(name, tmp_path):
    r = recipes.load(name)
    p = recipes.save(r, tmp_path / f"{name}.yaml")
    r2 = recipes.load(p)
    assert r2.to_dict() == r.to_dict()


def test_group_size_and_kv_override():
    r = recipes.load("int4-weight-only", group_size=64, kv_cache="fp8")
    assert r.targets[0].weight.group_size == 64
    assert r.kv_cache.format == "fp8_e4m3"
    # a group size that would change nothing is an error, not silently ignored: block
    # formats keep their own block, per-channel recipes have no group
    assert not recipes.takes_group_size("nvfp4") and not recipes.takes_group_size("int8")
    assert recipes.takes_group_size("int4-weight-only")
    for name in ("nvfp4", "int8", "fp8-dynamic"):
        with pytest.raises(ConfigError, match=f"recipe {name} has no grouped.*"
                                              "group_size=64 would be ignored"):
            recipes.load(name, group_size=64)


def test_moe_calibration_overrides():
    assert recipes.load("int4-gptq").calibrate_all_experts  # on with algorithm steps
    assert not recipes.load("int4-weight-only").calibrate_all_experts
    r = recipes.load("int4-gptq", moe_calibrate_all_experts=False, moe_min_tokens=5)
    assert not r.calibrate_all_experts and r.moe_min_tokens == 5


def test_later_entries_win_role_by_role():
    r = Recipe.parse({"targets": [
        {"pattern": "*", "weight": "int8", "input": {"format": "int8"}},
        {"pattern": "*down_proj", "weight": {"format": "int4", "granularity": "group",
                                             "group_size": 32}},
        {"pattern": "re:layers\\.0\\..*q_proj", "input": None},
    ]})
    s, _ = r.specs_for("model.layers.1.mlp.down_proj")
    assert s["weight"].format == "int4" and s["input"].format == "int8"
    s, _ = r.specs_for("model.layers.0.self_attn.q_proj")
    assert s["weight"].format == "int8" and s["input"] is None


def test_patterns():
    assert match("q_proj", "model.layers.0.self_attn.q_proj")
    assert match("*.mlp.*", "model.layers.0.mlp.up_proj")
    assert match("re:layers\\.[0-3]\\.", "model.layers.2.mlp.up_proj")
    assert not match("k_proj", "model.layers.0.self_attn.q_proj")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        match("re:(", "x")


@pytest.mark.parametrize("data,msg", [
    ({"targets": [{"pattern": "*", "weight": {"format": "int9"}}]}, "unknown format 'int9'"),
    ({"targets": [{"pattern": "*", "weight": {"format": "int8", "grp": 3}}]},
     "unknown key 'grp'"),
    ({"targets": [{"pattern": "*", "wieght": "int8"}]}, "unknown key 'wieght'"),
    ({"targetz": []}, "unknown key 'targetz'"),
    ({"targets": [{"pattern": "*", "weight": {"format": "fp8_e4m3", "symmetric": False}}]},
     "asymmetric quantization needs an integer format"),
    ({"targets": [{"pattern": "*", "weight": {"format": "int4", "granularity": "group"}}]},
     "needs a positive group_size"),
    ({"targets": [{"pattern": "*", "input": {"format": "int8", "granularity": "token"}}]},
     "set dynamic: true"),
    ({"group_policy": "maybe"}, "group_policy"),
])
def test_bad_recipes_name_the_problem(data, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        Recipe.parse(data)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_override():
    with pytest.raises(ConfigError, match="unknown recipe 'int3-magic'"):
        recipes.load("int3-magic")
    with pytest.raises(ConfigError, match="unknown recipe override 'gruop_size'"):
        recipes.load("int8", gruop_size=3)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("targets: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        recipes.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        recipes.load(tmp_path / "missing.yaml")
    p.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        recipes.load(p)
