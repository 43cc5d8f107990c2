"""Tiny seeded MoE causal LMs of every family lowbit's experts support (random weights).

``build_moe(family)`` gives a 2-layer model with hidden 64 and 4 experts (top-2) whose
weights are drawn with a larger spread than the families' init (std 0.2 for matrices), so
that quantization error and routing are visible. ``MOE_FAMILIES`` lists them.
"""

import torch

VOCAB = 128
H, I, E, K = 64, 64, 4, 2


def _common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def _config(family: str):
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**_common(num_key_value_heads=2, intermediate_size=I,
                                          num_local_experts=E, num_experts_per_tok=K)), \
            tf.MixtralForCausalLM
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_common(num_key_value_heads=2, intermediate_size=I,
                                           moe_intermediate_size=I,
                                           shared_expert_intermediate_size=I,
                                           num_experts=E, num_experts_per_tok=K)), \
            tf.Qwen2MoeForCausalLM
    if family == "qwen3_moe":
        # norm_topk_prob as every released Qwen3-MoE sets it (transformers' default is False)
        return tf.Qwen3MoeConfig(**_common(num_key_value_heads=2, intermediate_size=I,
                                           moe_intermediate_size=I, head_dim=16,
                                           norm_topk_prob=True,
                                           num_experts=E, num_experts_per_tok=K)), \
            tf.Qwen3MoeForCausalLM
    if family == "olmoe":
        # key/value heads = query heads, as OLMoE is released (llama.cpp reads only that)
        return tf.OlmoeConfig(**_common(num_key_value_heads=4, intermediate_size=I,
                                        num_experts=E, num_experts_per_tok=K)), \
            tf.OlmoeForCausalLM
    if family == "deepseek_v2":
        return tf.DeepseekV2Config(**_common(num_key_value_heads=4, intermediate_size=I,
                                             moe_intermediate_size=I, n_routed_experts=E,
                                             n_shared_experts=1, num_experts_per_tok=K,
                                             first_k_dense_replace=1, q_lora_rank=None,
                                             kv_lora_rank=16, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=16,
                                             n_group=1, topk_group=1)), \
            tf.DeepseekV2ForCausalLM
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**_common(num_key_value_heads=4, intermediate_size=I,
                                             moe_intermediate_size=I, n_routed_experts=E,
                                             n_shared_experts=1, num_experts_per_tok=K,
                                             first_k_dense_replace=1, n_group=1,
                                             topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16)), \
            tf.DeepseekV3ForCausalLM
    if family == "glm4_moe":
        return tf.Glm4MoeConfig(**_common(num_key_value_heads=2, intermediate_size=I,
                                          moe_intermediate_size=I, n_routed_experts=E,
                                          n_shared_experts=1, num_experts_per_tok=K,
                                          first_k_dense_replace=1, n_group=1, topk_group=1,
                                          head_dim=16)), \
            tf.Glm4MoeForCausalLM
    if family == "gpt_oss":
        return tf.GptOssConfig(**_common(num_key_value_heads=2, intermediate_size=I,
                                         num_local_experts=E, num_experts_per_tok=K,
                                         head_dim=16)), \
            tf.GptOssForCausalLM
    extra = {
        "phimoe": (lambda: tf.PhimoeConfig(**_common(num_key_value_heads=2, intermediate_size=I,
                                                     num_local_experts=E,
                                                     num_experts_per_tok=K)),
                   "PhimoeForCausalLM"),
        "minimax": (lambda: tf.MiniMaxConfig(**_common(num_key_value_heads=2,
                                                       intermediate_size=I, head_dim=16,
                                                       num_local_experts=E,
                                                       num_experts_per_tok=K)),
                    "MiniMaxForCausalLM"),
        "granitemoe": (lambda: tf.GraniteMoeConfig(**_common(num_key_value_heads=2,
                                                             intermediate_size=I,
                                                             num_local_experts=E,
                                                             num_experts_per_tok=K)),
                       "GraniteMoeForCausalLM"),
        "ernie4_5_moe": (lambda: tf.Ernie4_5_MoeConfig(**_common(
            num_key_value_heads=2, intermediate_size=I, moe_intermediate_size=I,
            moe_num_experts=E, moe_k=K, moe_num_shared_experts=1, moe_layer_start_index=0)),
            "Ernie4_5_MoeForCausalLM"),
        "dots1": (lambda: tf.Dots1Config(**_common(num_key_value_heads=2, intermediate_size=I,
                                                   moe_intermediate_size=I,
                                                   n_routed_experts=E, n_shared_experts=1,
                                                   num_experts_per_tok=K,
                                                   first_k_dense_replace=1)),
                  "Dots1ForCausalLM"),
        "hunyuan_v1_moe": (lambda: tf.HunYuanMoEV1Config(**_common(
            num_key_value_heads=2, intermediate_size=I, num_experts=E, moe_topk=K,
            head_dim=16)), "HunYuanMoEV1ForCausalLM"),
        "flex_olmo": (lambda: tf.FlexOlmoConfig(**_common(num_key_value_heads=2,
                                                          intermediate_size=I,
                                                          num_experts=E,
                                                          num_experts_per_tok=K)),
                      "FlexOlmoForCausalLM"),
    }
    if family in extra:
        cfg, cls = extra[family]
        return cfg(), getattr(tf, cls)
    raise ValueError(family)


#: families whose experts lowbit declares beyond MOE_FAMILIES: split and quantized, tested by
#: tests/adapters/test_experts.py; no adapter of their own yet (generic groups, no MoE folds)
EXTRA_MOE_FAMILIES = ["phimoe", "minimax", "granitemoe", "ernie4_5_moe", "dots1",
                      "hunyuan_v1_moe", "flex_olmo"]

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                "glm4_moe", "gpt_oss"]


def build_moe(family: str, dtype=torch.float32, seed: int = 0):
    """A tiny MoE causal LM of ``family`` (see the module doc), eval mode."""
    cfg, cls = _config(family)
    torch.manual_seed(seed)
    m = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m.to(dtype).eval()
