"""FastDecoder on the families beyond Llama's layer (Qwen3, Gemma-2/3, Phi-3, Granite, OLMo-2):
logits equal to the model's own forward, greedy tokens equal to ``generate``, in float32, on
packed int4/int8 weights and in bfloat16; sequences longer than the sliding window (8)."""

import pytest
import torch
import transformers as tf

import lowbit
import lowbit.runtime as rt
from lowbit.errors import ConfigError
from lowbit.runtime import FastDecoder
from tests.tiny_models import build, calib_ids, group_over, loop_over

FAMILIES = ["qwen3", "gemma2", "gemma3", "gemma3_mm", "phi3", "granite", "olmo2"]
N = 20  # prompt tokens: longer than the tiny Gemma sliding window of 8


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def ids_of(n=N, seed=1):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def eos_of(m):
    e = m.generation_config.eos_token_id
    return None if e is None else [e] if isinstance(e, int) else list(e)


def hf_greedy(m, ids, n):
    return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False, pad_token_id=0)


def agrees(m, ids, tol=1e-5, new=12):
    """The decoder's logits (whole prompt, two chunks, token by token) against the model's
    forward, and its greedy tokens against generate's; returns the largest error."""
    t = ids.shape[1]
    with torch.inference_mode():
        ref = m(ids).logits[0]
        dec = FastDecoder(m)
        errs = [rel(dec.forward(ids[0], 0, all_logits=True), ref)]
        a = dec.forward(ids[0, :7], 0, all_logits=True)
        b = dec.forward(ids[0, 7:], 7, all_logits=True)
        errs.append(rel(torch.cat([a, b]), ref))
        errs += [rel(dec.forward(ids[0, i:i + 1], i), ref[i]) for i in range(t)]
        assert max(errs) < tol, errs
        assert torch.equal(dec.generate(ids, new, eos_token_id=eos_of(m)),
                           hf_greedy(m, ids, new))
    return dec, max(errs)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_agrees(family):
    m = build(family)
    dec, _ = agrees(m, ids_of())
    # the Llama step stays for a family with nothing beyond Llama's layer (Phi-3's fused
    # projections are one matmul each already)
    assert dec._fast == (family == "phi3")


@pytest.mark.parametrize("recipe", ["int4-weight-only", "int8-weight-only"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_and_bfloat16_agree(family, recipe):
    m = build(family)
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(2, 16)),
                    **group_over(recipe, 32))
    kern = rt.convert(m)
    assert kern[recipe.replace("-", "_")] >= 8
    ids = ids_of(12, seed=3)
    with torch.inference_mode():
        before = m(ids).logits[0]
        dec = FastDecoder(m)
        assert rel(dec.forward(ids[0], 0, all_logits=True), before) < 1e-5
        # each decode step against generate's step logits (same kernels, one row each)
        g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                       do_sample=False, pad_token_id=0, output_logits=True,
                       return_dict_in_generate=True)
        new = g.sequences[0, 12:]
        step = dec.forward(ids[0], 0)
        for i, lg in enumerate(g.logits):
            assert rel(step, lg[0]) < 1e-5
            step = dec.forward(new[i:i + 1], 12 + i)
        assert torch.equal(dec.generate(ids, 10, eos_token_id=eos_of(m)), g.sequences)
        m = m.to(torch.bfloat16)
        ref = m(ids).logits[0]
        dec = FastDecoder(m)
        got = dec.forward(ids[0], 0, all_logits=True)
        dec.forward(ids[0, :11], 0)
        last = dec.forward(ids[0, 11:], 11)
    assert got.dtype == torch.bfloat16
    assert rel(got, ref) < 2e-2 and rel(last, ref[11]) < 2e-2


def _gemma2(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8)
    cfg.update(kw)
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(**cfg)).eval()


def _changes(m, ids, poke) -> float:
    """How much the decoder's logits move when ``poke(dec)`` removes one piece (the
    agreement tolerance is 1e-5: a piece that moves them by more than 1e-4 is tested)."""
    with torch.inference_mode():
        ref = m(ids).logits[0]
        dec = FastDecoder(m)
        poke(dec)
        return rel(dec.forward(ids[0], 0, all_logits=True), ref)


def test_gemma2_soft_caps_and_window_are_applied():
    # caps small enough to bend these tiny random scores and logits
    m = _gemma2(attn_logit_softcapping=0.02, final_logit_softcapping=0.2)
    agrees(m, ids_of())
    ids = ids_of()
    assert _changes(m, ids, lambda d: setattr(d.plan, "attn_softcap", None)) > 1e-4
    assert _changes(m, ids, lambda d: setattr(d.plan, "final_softcap", None)) > 1e-4
    assert _changes(m, ids, lambda d: [setattr(L, "win", None) for L in d.layers]) > 1e-4
    assert _changes(m, ids, lambda d: setattr(d.plan, "scale", 16 ** -0.5)) > 1e-4


def test_gemma3_local_and_global_layers():
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"],
                              final_logit_softcapping=0.3)
    m = tf.Gemma3ForCausalLM(cfg).eval()
    dec, _ = agrees(m, ids_of())
    assert [L.win for L in dec.layers] == [8, None]
    assert [L.rk for L in dec.layers] == ["sliding_attention", "full_attention"]
    ids = ids_of()
    # the global layer reads its own rotary base; both norms around the MLP count
    assert _changes(m, ids, lambda d: setattr(d.layers[1], "rk", "sliding_attention")) > 1e-4
    assert _changes(m, ids, lambda d: [setattr(L, "n_pm", None) for L in d.layers]) > 1e-4


def test_phi3_partial_rotary_and_longrope():
    torch.manual_seed(0)
    rot = 8  # of 16 per head
    cfg = tf.Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, original_max_position_embeddings=16,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.5,
                                         "original_max_position_embeddings": 16,
                                         "short_factor": [1.0, 1.5, 2.0, 3.0],
                                         "long_factor": [2.0, 4.0, 8.0, 16.0]})
    m = tf.Phi3ForCausalLM(cfg).eval()
    with torch.inference_mode():
        dec = FastDecoder(m)
        assert dec.plan.rope.rot_dim == rot and not dec._fast
        # a 12-token prompt on the short factors, decoding past 16 on the long ones, as
        # transformers switches per call
        ids = ids_of(12)
        g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14,
                       do_sample=False, pad_token_id=0, output_logits=True,
                       return_dict_in_generate=True, eos_token_id=None)
        new = g.sequences[0, 12:]
        step = dec.forward(ids[0], 0)
        for i, lg in enumerate(g.logits):
            assert rel(step, lg[0]) < 1e-5, i
            step = dec.forward(new[i:i + 1], 12 + i)
        assert torch.equal(dec.generate(ids, 14), g.sequences)
        # a whole prompt past the original length: the long factors throughout
        ids = ids_of(20)
        assert rel(dec.forward(ids[0], 0, all_logits=True), m(ids).logits[0]) < 1e-5


def test_granite_multipliers_and_olmo2_norms_are_applied():
    ids = ids_of()
    m = build("granite")
    assert FastDecoder(m).plan.embed_mult == 4.0  # the model multiplies, not its embedding
    assert FastDecoder(build("gemma2")).plan.embed_mult is None  # its embedding scales itself
    for piece in ("embed_mult", "resid_mult", "logit_mult"):
        assert _changes(m, ids, lambda d: setattr(d.plan, piece, None)) > 1e-4
    m = build("olmo2")
    dec = FastDecoder(m)
    assert {L.qk for L in dec.layers} == {"proj"} and dec.layers[0].n_in is None
    assert _changes(m, ids, lambda d: [setattr(L, "n_pm", None) for L in d.layers]) > 1e-4
    assert {L.qk for L in FastDecoder(build("qwen3")).layers} == {"head"}


def test_mistral_beyond_its_window_takes_the_general_step():
    m = build("mistral")
    m.config.sliding_window = 8
    dec, _ = agrees(m, ids_of())
    assert not dec._fast
    dec = FastDecoder(m)
    dec.generate(ids_of(4), 4)  # a cache of 8: the window covers it, the Llama step runs
    assert dec._fast


def test_refusals_name_the_missing_piece():
    m = build("llama")
    m.config.hidden_act = "relu"
    with pytest.raises(ConfigError, match="MLP activations .* got 'relu'"):
        FastDecoder(m)
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                "rope_theta": 10000.0}))
    with pytest.raises(ConfigError, match="rope_type 'dynamic'"):
        FastDecoder(m)
    m = build("qwen3")
    m.config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ConfigError, match="layer_types has chunked_attention"):
        FastDecoder(m)
    m = build("gemma3_mm")
    m.config.text_config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping .* multimodal"):
        FastDecoder(m)
    m = build("gemma3")
    m.config.attn_logit_softcapping = 50.0
    with pytest.raises(ConfigError, match="attn_logit_softcapping"):
        FastDecoder(m)
    m = build("qwen3")
    m.model.layers[0].extra_norm = type(m.model.norm)(64)
    with pytest.raises(ConfigError, match="layer 0: .* extra_norm"):
        FastDecoder(m)
    m = build("llama")  # the layout must be the one the family's adapter declares
    del m.model.layers[1].input_layernorm
    with pytest.raises(ConfigError, match="layer 1: the adapter declares input_layernorm in "
                                          "front of self_attn"):
        FastDecoder(m)
