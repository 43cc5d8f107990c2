"""Every dense family is recognised by its declared adapter, and its declared facts are
what the tiny model does (issue 18, item 3).

The multimodal Gemma-3 class: the text tower's blocks, Gemma-2's groups and ``1 + w``
norms; its vision tower and projector see no activations when calibration feeds text, so
a recipe with static activation quantizers refuses them by name unless they are excluded
(:func:`lowbit.adapters.facts.unreached_patterns`), and weight-only recipes quantize them.
"""

import math
import warnings

import pytest
import torch

import lowbit
from lowbit import recipes
from lowbit.adapters import facts, get_adapter
from tests.tiny_models import DENSE_FAMILIES, build, calib_ids, loop_over

ADAPTERS = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
            "gemma3": "gemma2", "gpt2": "gpt2", "opt": "opt", "gemma2": "gemma2",
            "gemma3_mm": "gemma3_mm", "phi3": "phi3", "olmo2": "olmo2", "granite": "granite"}


def test_every_dense_family_has_its_declared_adapter():
    assert set(ADAPTERS) == set(DENSE_FAMILIES)
    for fam in DENSE_FAMILIES:
        assert get_adapter(build(fam)).name == ADAPTERS[fam], fam


@pytest.mark.parametrize("family,offset", [("llama", 0.0), ("phi3", 0.0), ("gpt2", 0.0),
                                           ("gemma2", 1.0), ("gemma3", 1.0),
                                           ("gemma3_mm", 1.0), ("olmo2", None)])
def test_declared_norm_offset_is_what_the_norms_do(family, offset):
    from lowbit.adapters import norm_offset

    model = build(family)
    assert facts.norm_offset(model) == offset
    if offset is not None:
        a = get_adapter(model)
        block = a.find_blocks(model)[1][0]
        for g in a.input_groups(block):
            assert norm_offset(block.get_submodule(g.prev)) == offset


def test_gemma_scalars_are_the_models():
    m = build("gemma2")
    sc = facts.scalars(m)
    assert sc["embedding_scale"] == math.sqrt(64) == float(m.model.embed_tokens.embed_scale)
    assert sc["attn_logit_softcap"] == 50.0 and sc["final_logit_softcap"] == 30.0
    assert sc["attention_scale"] == m.model.layers[0].self_attn.scaling
    mm = build("gemma3_mm")
    assert facts.text_config(mm) is mm.config.text_config
    assert facts.scalars(mm)["embedding_scale"] == \
        float(mm.model.language_model.embed_tokens.embed_scale)


def test_granite_scalars_are_the_models():
    m = build("granite")
    sc = facts.scalars(m)
    assert sc["embedding_scale"] == m.model.embedding_multiplier == 4.0
    assert sc["residual_multiplier"] == m.model.layers[0].residual_multiplier == 0.5
    assert sc["attention_scale"] == m.model.layers[0].self_attn.scaling == 0.1
    assert sc["logits_scale"] == 0.5
    assert facts.scalars(build("llama")) == facts.DEFAULT_SCALARS


def test_rotary_dim_reads_partial_rotary_factor():
    import transformers as tf

    cfg = tf.Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        partial_rotary_factor=0.5)
    assert facts.head_dim(cfg) == 16 and facts.rotary_dim(cfg) == 8
    m = build("phi3")
    assert facts.rotary_dim(m.config) == 16
    # what the model's rotary embedding produces: cos/sin of rotary_dim per position
    x = torch.zeros(1, 3, 64)
    cos, _ = m.model.rotary_emb(x, torch.arange(3)[None])
    assert cos.shape[-1] == facts.rotary_dim(m.config)
    p = tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=32,
                                         partial_rotary_factor=0.5, pad_token_id=0))
    cos, _ = p.model.rotary_emb(x, torch.arange(3)[None])
    assert cos.shape[-1] == facts.rotary_dim(p.config) == 8


def test_fused_projections_declared():
    assert [(f.name, f.parts) for f in facts.fused(build("phi3"))] == [
        ("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("gate", "up"))]
    assert [(f.name, f.parts) for f in facts.fused(build("gpt2"))] == [
        ("attn.c_attn", ("q", "k", "v"))]
    assert facts.fused(build("llama")) == ()


# --- the multimodal Gemma-3 class -------------------------------------------------------------


def _quantize(model, recipe):
    ids = calib_ids(4, 16)
    with torch.no_grad():
        ref = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, recipe, loop_over(ids))
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).norm() / ref.norm())


def test_gemma3_mm_text_tower_and_unreached_modules():
    m = build("gemma3_mm")
    path, blocks = get_adapter(m).find_blocks(m)
    assert path == "model.language_model.layers" and len(blocks) == 2
    assert [p for p, _ in facts.unreached_modules(m)] == ["model.vision_tower",
                                                          "model.multi_modal_projector"]
    assert facts.unreached_patterns(m) == ["model.vision_tower*",
                                           "model.multi_modal_projector*"]
    assert facts.unreached_modules(build("llama")) == []


@pytest.mark.parametrize("recipe", ["int4-gptq", "int4-awq"])
def test_gemma3_mm_weight_only_recipes(recipe):
    """The text blocks run the algorithm (AWQ folds its 4 groups per block); the vision
    tower's linears get their weights quantized without data (round to nearest)."""
    m = build("gemma3_mm")
    err = _quantize(m, recipe)
    assert err < 0.5
    rep = m.lowbit_report
    assert len(rep.blocks) == 2
    if recipe == "int4-awq":
        assert all(len(b["awq_alpha"]) == 4 and b["fold_error"] < 1e-5 for b in rep.blocks)
    vq = m.model.vision_tower.encoder.layers[0].self_attn.q_proj
    assert vq.weight_quantizer.is_enabled


def test_gemma3_mm_smoothquant_leaves_the_unreached_vision_tower_in_float():
    """Text calibration never reaches the declared vision tower: its static quantizers saw
    no data, so it stays in float with an 'unreached' coverage line (lowbit.pipeline.unreached,
    tests/pipeline/test_unreached.py); excluding it by pattern still works."""
    m = build("gemma3_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _quantize(m, "int8-smoothquant")
    kinds = {kind for kind, *_ in m.lowbit_report.coverage.kinds()}
    assert "unreached" in kinds
    m = build("gemma3_mm")
    base = recipes.load("int8-smoothquant")
    r = recipes.load(base, exclude=[*base.exclude, *facts.unreached_patterns(m)])
    err = _quantize(m, r)
    assert err < 0.1
    rep = m.lowbit_report
    assert all(len(b["smoothquant_alpha"]) == 4 and b["fold_error"] < 1e-5 for b in rep.blocks)
    reasons = {reason for kind, reason, *_ in rep.coverage.kinds() if kind == "excluded"}
    assert "excluded by recipe pattern 'model.vision_tower*'" in reasons


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3", "gemma3_mm", "phi3",
                                    "olmo2", "granite"])
def test_gguf_archs_agree_with_the_adapters(family):
    """lowbit.adapters.gguf_archs (GGUF export) declares a few facts again: they must be the
    adapter's (norm kind, text tower, towers outside the text blocks)."""
    from lowbit.adapters.gguf_archs import GGUF_ARCHS

    m = build(family)
    arch = GGUF_ARCHS[m.config.model_type]
    # the norm kind is not declared again: the exporter reads the adapter's (test_gguf_families)
    assert not hasattr(arch, "norm_plus_one")
    ignored = {f for t, f in get_adapter(m).ignores if t in (None, m.config.model_type)}
    assert set(arch.no_softcaps) <= ignored
    path = get_adapter(m).find_blocks(m)[0]
    if arch.text_prefix is not None:
        assert path == arch.text_prefix + "layers"
        assert sorted(arch.other_towers) == sorted(p + "." for p, _ in facts.unreached_modules(m))
    else:
        assert path == "model.layers" and facts.unreached_modules(m) == []


def test_fused_parts_of_a_packed_model():
    """FastDecoder reads the fused layout of a model converted by lowbit.runtime.convert
    (PackedLinear has no float weight: its in/out features are used)."""
    from lowbit import runtime
    from lowbit.adapters import fused_parts

    m = build("phi3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(m, "int4-weight-only", loop_over(calib_ids(2, 8)))
        runtime.convert(m)
    b = m.model.layers[0]
    assert type(b.self_attn.qkv_proj).__name__ == "PackedLinear"
    assert fused_parts(m, b, "self_attn.qkv_proj") == [("q", slice(0, 64)), ("k", slice(64, 96)),
                                                       ("v", slice(96, 128))]
    assert fused_parts(m, b, "mlp.gate_up_proj")[1] == ("up", slice(128, 256))


@pytest.mark.parametrize("family,field,applied", [
    ("gemma2", "attn_logit_softcapping", True), ("gemma2", "final_logit_softcapping", True),
    ("gemma3", "attn_logit_softcapping", False), ("gemma3", "final_logit_softcapping", True),
    ("gemma3_mm", "attn_logit_softcapping", False),
    ("gemma3_mm", "final_logit_softcapping", False)])
def test_ignored_config_is_what_transformers_ignores(family, field, applied):
    """A soft-cap the family declares ignored does not change the logits; the others do."""
    m = build(family)
    cfg = facts.text_config(m)
    ids = calib_ids(1, 8)

    def set_all(v):
        setattr(cfg, field, v)
        for mod in m.modules():  # attention modules copy the value at construction
            if hasattr(mod, field):
                setattr(mod, field, v)
        with torch.no_grad():
            return m(ids).logits

    ref = set_all(None)
    out = set_all(0.5)
    assert (not torch.equal(out, ref)) == applied
    assert (field in facts.ignored_config(m)) == (not applied)


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_declared_attention_modules_are_the_ones_the_kv_cache_finds(family):
    from lowbit.nn import find_attention_modules

    m = build(family)
    declared = [n for n, _ in facts.attention_modules(m)]
    assert len(declared) == 2
    assert declared == [n for n, _ in find_attention_modules(m) if n in declared]
    assert set(declared) == {n for n, _ in find_attention_modules(m)
                             if not n.startswith("model.vision_tower")}


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_mlp_matrices_by_model_type_agree_with_the_models(family):
    """facts.mlp_matrices / ties_by_default (keyed on model_type, for config.json alone: the
    memory estimator) say what the built models have: MLP weight elements over
    hidden * intermediate, tying of the LM head."""
    from lowbit.adapters import is_linear

    m = build(family)
    cfg = facts.text_config(m)
    mt = m.config.model_type
    blk = get_adapter(m).find_blocks(m)[1][0]
    attn = get_adapter(m).attention
    inter = next((getattr(cfg, k) for k in ("intermediate_size", "ffn_dim", "n_inner")
                  if getattr(cfg, k, None)), 4 * cfg.hidden_size)
    n = sum(x.weight.numel() for name, x in blk.named_modules()
            if is_linear(x) and not name.startswith(attn + "."))
    assert n == facts.mlp_matrices(mt) * cfg.hidden_size * inter
    if facts.ties_by_default(mt):
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
