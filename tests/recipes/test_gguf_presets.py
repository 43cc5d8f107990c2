"""The gguf-* mix presets: listed with descriptions, YAML round trip, overrides, and
lowbit.quantize expanding the mix into one gguf_* spec per linear (llama-quantize's types)."""

import warnings

import pytest
import torch

import lowbit
from lowbit import recipes
from lowbit.adapters import gguf_mix as gm
from lowbit.config import Recipe
from lowbit.errors import ConfigError
from lowbit.nn import QuantMixin
from tests.tiny_models import build, calib_ids, loop_over

MIXES = ["q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs", "iq4_nl"]
VARIANTS = {"": [], "-imatrix": ["imatrix"], "-gptq": ["gptq"], "-awq": ["awq", "imatrix"]}


def test_every_mix_preset_listed_with_description():
    names = recipes.names()
    for mix in MIXES:
        for suffix, steps in VARIANTS.items():
            name = f"gguf-{mix}{suffix}"
            assert name in names
            r = recipes.load(name)
            assert r.name == name and r.gguf_mix.ftype == mix
            assert [a.name for a in r.algorithms] == steps
            assert mix.upper() in r.description and len(r.description) > 80
    assert "gguf-q4_0" in names and "gguf-q8_0" in names  # the exact-int4/int8 presets stay


@pytest.mark.parametrize("name", ["gguf-q4_k_m", "gguf-iq4_xs-imatrix"])
def test_yaml_round_trip(name, tmp_path):
    r = recipes.load(name)
    r2 = recipes.load(recipes.save(r, tmp_path / "r.yaml"))
    assert r2.to_dict() == r.to_dict() and r2.gguf_mix == r.gguf_mix


def test_recipe_field_and_errors():
    r = Recipe.parse({"gguf_mix": "Q4_K"})  # llama-quantize's spelling and alias
    assert r.gguf_mix.ftype == "q4_k_m" and r.gguf_mix.output_type is None
    r = Recipe.parse({"gguf_mix": {"ftype": "q5_k_m", "output_type": "Q8_0", "pure": True}})
    assert (r.gguf_mix.output_type, r.gguf_mix.pure) == ("q8_0", True)
    with pytest.raises(ConfigError, match="gguf_mix.ftype: GGUF mix 'iq2_xs' is not supported"):
        Recipe.parse({"gguf_mix": "iq2_xs"})
    with pytest.raises(ConfigError, match="gguf_mix.output_type: output_type 'q9_k'"):
        Recipe.parse({"gguf_mix": {"ftype": "q4_k_m", "output_type": "q9_k"}})
    with pytest.raises(ConfigError, match="unknown key 'gguf_mix.pur'; expected one of: "
                                          "ftype, output_type"):
        Recipe.parse({"gguf_mix": {"ftype": "q4_k_m", "pur": True}})
    with pytest.raises(ConfigError, match="gguf_mix.ftype: Field required"):
        Recipe.parse({"gguf_mix": {"pure": True}})


def test_mix_override():
    r = recipes.load("gguf-q4_k_m", gguf_mix={"embedding_type": "q8_0"})
    assert (r.gguf_mix.ftype, r.gguf_mix.embedding_type) == ("q4_k_m", "q8_0")
    r = recipes.load("int8", gguf_mix="q6_k")
    assert r.gguf_mix.ftype == "q6_k"
    with pytest.raises(ConfigError, match="has no gguf_mix: the gguf_mix override .* needs "
                                          "an ftype"):
        recipes.load("int8", gguf_mix={"pure": True})


def _wide(layers=2):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    return tf.LlamaForCausalLM(cfg).eval()


def _formats(model) -> dict[str, str]:
    return {n: m.weight_quantizer.spec.format for n, m in model.named_modules()
            if isinstance(m, QuantMixin)}


def test_quantize_expands_mix_tiny_llama():
    m = build("llama")
    plan = gm.plan(m, "q4_k_m")
    with pytest.warns(UserWarning, match="14 layers took llama.cpp's type fallback"):
        lowbit.quantize(m, "gguf-q4_k_m")
    want = {k: "gguf_" + t.lower() for k, t in plan.types().items()}
    assert _formats(m) == want and len(want) == 14
    # every K type falls back at hidden 64: Q4_K -> Q5_0, Q6_K -> Q8_0 (use_more_bits(1, 2))
    assert set(want.values()) == {"gguf_q5_0", "gguf_q8_0"}
    assert want["model.layers.1.mlp.down_proj"] == "gguf_q8_0"
    rep = m.lowbit_report.gguf_mix
    assert rep["ftype"] == "q4_k_m" and rep["output"] == "Q8_0" and rep["token_embd"] == "Q5_0"
    assert "fallback" in rep["modules"]["model.layers.0.self_attn.q_proj"]["why"]
    assert m.lowbit_recipe.gguf_mix.ftype == "q4_k_m"
    assert torch.isfinite(m(calib_ids()[:1]).logits).all()


def test_quantize_wide_model_gets_k_types():
    m = _wide()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back at widths 256/512
        lowbit.quantize(m, "gguf-q4_k_m")
    f = _formats(m)
    # 2 layers: use_more_bits(1, 2) only -> layer 1's attn_v / ffn_down Q6_K
    assert f["model.layers.0.self_attn.v_proj"] == "gguf_q4_k"
    assert f["model.layers.1.self_attn.v_proj"] == "gguf_q6_k"
    assert f["model.layers.1.mlp.down_proj"] == "gguf_q6_k"
    assert f["model.layers.0.mlp.gate_proj"] == "gguf_q4_k"
    assert m.lowbit_report.gguf_mix["output"] == "Q6_K"


def test_recipe_targets_override_the_mix_and_pure():
    m = build("llama")
    r = Recipe.parse({"name": "mine", "gguf_mix": {"ftype": "q4_k_m", "pure": True},
                      "targets": [{"pattern": "*down_proj", "weight": {"format": "gguf_q8_0"}}]})
    with pytest.warns(UserWarning, match="fallback"):
        lowbit.quantize(m, r)
    f = _formats(m)
    assert f["model.layers.1.mlp.down_proj"] == "gguf_q8_0"
    assert f["model.layers.1.self_attn.v_proj"] == "gguf_q5_0"  # --pure: Q4_K -> Q5_0


@pytest.mark.parametrize("preset", ["gguf-q4_k_m-imatrix", "gguf-q4_k_m-gptq"])
def test_calibrated_variants_run(preset):
    m = build("llama")
    with pytest.warns(UserWarning, match="fallback"):
        lowbit.quantize(m, preset, forward_loop=loop_over(calib_ids()))
    assert len(_formats(m)) == 14
    assert torch.isfinite(m(calib_ids()[:1]).logits).all()


def test_imatrix_step_turns_on_imatrix_rules():
    # IQ4_XS without an imatrix raises the first eighth of ffn_down to Q5_K; with one not
    m = _wide(layers=8)
    p0 = gm.plan(m, "iq4_nl")
    p1 = gm.plan(m, "iq4_nl", has_imatrix=True)
    assert p0.types()["model.layers.0.mlp.down_proj"] == "Q5_K"
    assert p1.types()["model.layers.0.mlp.down_proj"] == "IQ4_NL"
    _, p = gm.expand(m, recipes.load("gguf-iq4_nl-imatrix"))
    assert p.types() == p1.types()
    _, p = gm.expand(m, recipes.load("gguf-iq4_nl"))
    assert p.types() == p0.types()


def _file_types(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors
            if len(t.shape) >= 2 and int(t.shape[1]) > 1}


@pytest.mark.parametrize("preset", ["gguf-q4_k_m", "gguf-q3_k_m", "gguf-iq4_xs"])
def test_export_writes_the_mix_types_and_reload(preset, tmp_path):
    """quantize -> GGUF: every matrix in the planned type (the exporter takes token_embd /
    output from the recipe's mix); and native save -> load -> GGUF gives the same types."""
    m = _wide()
    lowbit.quantize(m, preset)
    plan = m.lowbit_report.gguf_mix
    want = {v["tensor"]: v["type"] for v in plan["modules"].values()}
    want["token_embd.weight"], want["output.weight"] = plan["token_embd"], plan["output"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "token_embd quantized in the file only"
        lowbit.save(m, tmp_path / "g", format="gguf")
    assert _file_types(tmp_path / "g" / "model.gguf") == want
    lowbit.save(m, tmp_path / "n")
    back = lowbit.load(tmp_path / "n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.save(back, tmp_path / "g2", format="gguf")
    assert _file_types(tmp_path / "g2" / "model.gguf") == want


LLAMA_BIN = "/work/cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"


@pytest.mark.external
@pytest.mark.skipif(not __import__("os").path.exists(LLAMA_BIN + "/llama-quantize"),
                    reason="needs llama.cpp's llama-quantize")
@pytest.mark.parametrize("ftype", MIXES)
def test_exported_types_equal_llama_quantize(ftype, tmp_path):
    """The types of lowbit's GGUF (quantize with gguf-<mix>, export) equal those llama-quantize
    gives the same model's F32 GGUF (--dry-run)."""
    from tests.adapters.test_gguf_mix import _dry_run

    m = _wide(layers=8)
    lowbit.save(m, tmp_path / "f32", format="gguf")
    ref = _dry_run(tmp_path / "f32" / "model.gguf", ftype)
    lowbit.quantize(m, f"gguf-{ftype}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.save(m, tmp_path / "q", format="gguf")
    got = _file_types(tmp_path / "q" / "model.gguf")
    assert got == ref


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_mix_experts_share_their_tensor_type(family, tmp_path):
    """Split experts of one stacked ``*_exps`` tensor get its one type; routers stay float."""
    from tests.moe_models import build_moe

    m = build_moe(family)
    with pytest.warns(UserWarning, match="fallback"):
        lowbit.quantize(m, "gguf-q4_k_m")
    plan = m.lowbit_report.gguf_mix
    f = _formats(m)
    assert f == {k: "gguf_" + v["type"].lower() for k, v in plan["modules"].items()}
    downs = {v for k, v in f.items() if k.startswith("model.layers.1.mlp.experts.")
             and k.endswith("down_proj")}
    assert downs == {"gguf_q8_0"}  # use_more_bits(1, 2): Q6_K -> Q8_0 (64 columns)
    assert not any("gate.weight" in v["tensor"] or "gate_inp" in v["tensor"]
                   for v in plan["modules"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.save(m, tmp_path / "g", format="gguf")
    want = {v["tensor"]: v["type"] for v in plan["modules"].values()}
    want["token_embd.weight"], want["output.weight"] = plan["token_embd"], plan["output"]
    got = _file_types(tmp_path / "g" / "model.gguf")
    assert {k: v for k, v in got.items() if "gate_inp" not in k} == want
