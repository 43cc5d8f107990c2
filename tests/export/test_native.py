"""Native lowbit checkpoints: packed codes + scales + recipe; ``lowbit.load`` rebuilds the
quantized model without the FP checkpoint, bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.errors import CheckpointError
from tests.tiny_models import build, calib_ids, loop_over

CASES = [("int4-weight-only", {"group_size": 32}), ("int4-weight-only-asym", {"group_size": 32}),
         ("int8", {}), ("fp8", {"kv_cache": "fp8"}), ("nvfp4", {}), ("mxfp4", {}),
         ("int4-gptq", {"group_size": 32}), ("int8-smoothquant", {"kv_cache": "int8"})]
IDS = calib_ids(2, 24, seed=7)


def quantized(recipe, kw=None, model=None):
    m = model if model is not None else build("llama")
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(6, 24)), **(kw or {}))
    return m


@pytest.mark.parametrize("recipe,kw", CASES, ids=[c[0] for c in CASES])
def test_reload_is_bit_exact(recipe, kw, tmp_path):
    m = quantized(recipe, kw)
    lowbit.save(m, tmp_path / "ckpt")
    m2 = lowbit.load(tmp_path / "ckpt")
    assert torch.equal(m(IDS).logits, m2(IDS).logits)
    assert m2.lowbit_recipe == m.lowbit_recipe
    if kw.get("kv_cache"):
        q1 = m.model.layers[1].self_attn.v_cache_quantizer
        q2 = m2.model.layers[1].self_attn.v_cache_quantizer
        assert q2.spec == q1.spec and torch.equal(q1.amax, q2.amax)


def test_bfloat16_model_reload_is_bit_exact(tmp_path):
    m = build("llama")
    for p in m.parameters():
        p.data = p.data.bfloat16()
    quantized("nvfp4", model=m)
    lowbit.save(m, tmp_path / "ckpt")
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert sd["model.norm.weight"].dtype == torch.bfloat16
    m2 = lowbit.load(tmp_path / "ckpt")
    assert m2.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(m(IDS).logits, m2(IDS).logits)


def test_contents(tmp_path):
    m = quantized("int4-weight-only-asym", {"group_size": 32})
    lowbit.save(m, tmp_path / "ckpt")
    out = tmp_path / "ckpt"
    assert {p.name for p in out.iterdir()} >= {"config.json", "generation_config.json",
                                              "lowbit_checkpoint.json", "model.safetensors"}
    meta = json.loads((out / "lowbit_checkpoint.json").read_text())
    assert meta["recipe"]["name"] == "int4-weight-only-asym"
    assert meta["modules"]["model.layers.0.mlp.up_proj"]["weight"]["group_size"] == 32
    sd = load_file(str(out / "model.safetensors"))
    k = "model.layers.0.mlp.down_proj.weight"  # [64, 128]
    assert sd[f"{k}.codes"].dtype == torch.uint8 and sd[f"{k}.codes"].shape == (64, 64)
    assert sd[f"{k}.scale"].shape == (64, 4) and sd[f"{k}.scale"].dtype == torch.float32
    zp = sd[f"{k}.zero_point"]  # 4-bit codes, two per byte
    assert zp.dtype == torch.uint8 and zp.shape == (64, 2)
    assert k not in sd and "lm_head.weight" in sd  # the tiny Llama is untied
    assert not any("_quantizer" in k for k in sd)  # weights carry no statistics


def test_sharded_and_packed_sizes(tmp_path):
    m = quantized("int4-weight-only", {"group_size": 32})
    out = tmp_path / "ckpt"
    lowbit.save(m, out, max_shard_size=50_000)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    sd = {}
    for f in set(idx["weight_map"].values()):
        sd.update(load_file(str(out / f)))
    assert set(sd) == set(idx["weight_map"])
    w = m.model.layers[0].mlp.down_proj.weight
    c = sd["model.layers.0.mlp.down_proj.weight.codes"]
    assert c.dtype == torch.uint8 and c.numel() == w.numel() // 2  # two int4 per byte
    assert torch.equal(lowbit.load(out)(IDS).logits, m(IDS).logits)


def test_16_bit_scales_stored_in_16_bits(tmp_path):
    recipe = {"name": "int4-fp16-scales", "targets": [{"pattern": "*", "weight": {
        "format": "int4", "granularity": "group", "group_size": 32, "scale_format": "fp16",
        "symmetric": False}}]}
    m = quantized(recipe)
    lowbit.save(m, tmp_path / "ckpt")
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert sd["model.layers.0.mlp.up_proj.weight.scale"].dtype == torch.float16
    assert torch.equal(lowbit.load(tmp_path / "ckpt")(IDS).logits, m(IDS).logits)


def test_tied_embeddings(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         tie_word_embeddings=True)
    m = quantized("int8-dynamic", model=tf.LlamaForCausalLM(cfg).eval())
    lowbit.save(m, tmp_path / "ckpt")
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    m2 = lowbit.load(tmp_path / "ckpt")
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert torch.equal(m(IDS).logits, m2(IDS).logits)


def test_without_recipe_and_with_disabled_quantizers(tmp_path):
    from lowbit.core import QuantSpec
    from lowbit.nn import quantize_module

    m = build("llama")
    spec = QuantSpec(format="int4", granularity="group", group_size=16, symmetric=False)
    quantize_module(m.model.layers[1].mlp.down_proj, weight=spec,
                    input=QuantSpec(format="int8", granularity="token", dynamic=True),
                    name="model.layers.1.mlp.down_proj")
    m2 = quantized("fp8-dynamic")
    lowbit.disable_quantizers(m2, "*input_quantizer")
    lowbit.save(m, tmp_path / "a")
    lowbit.save(m2, tmp_path / "b")
    for ref, path in ((m, "a"), (m2, "b")):
        r = lowbit.load(tmp_path / path)
        assert torch.equal(ref(IDS).logits, r(IDS).logits)
    assert not lowbit.load(tmp_path / "b").model.layers[0].mlp.up_proj.input_quantizer.is_enabled


def test_output_exists_and_atomic(tmp_path):
    m = quantized("int8-dynamic")
    out = tmp_path / "ckpt"
    lowbit.save(m, out)
    with pytest.raises(CheckpointError, match="already exists"):
        lowbit.save(m, out)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    import lowbit.export.native as nat

    orig = nat.write_shards
    nat.write_shards = boom
    try:
        with pytest.raises(RuntimeError):
            lowbit.save(m, tmp_path / "other")
    finally:
        nat.write_shards = orig
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left
    lowbit.save(m, out, overwrite=True)
    assert torch.equal(lowbit.load(out)(IDS).logits, m(IDS).logits)


@pytest.mark.slow
def test_real_model_int4_g64(tmp_path):
    """SmolLM2-135M int4 g64: reloaded from the checkpoint alone (with its tokenizer), the
    logits equal the fake-quantized model's."""
    from lowbit.data import load_model

    model, tok = load_model()
    lowbit.quantize(model, "int4-weight-only", group_size=64)
    lowbit.save(model, tmp_path / "ckpt", tokenizer=tok, max_shard_size=40_000_000)
    m2, tok2 = load_model(tmp_path / "ckpt")  # lowbit.data recognises the native checkpoint
    ids = tok2("It is a truth universally acknowledged", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, m2(ids).logits)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
