"""Tiny seeded transformers models built from configs (random weights), and a small CNN."""

import torch
from torch import nn

VOCAB = 128


def build(family: str, dtype=torch.float32):
    """A tiny causal LM of ``family`` with seeded random weights, in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB)
    if family == "llama2_sp":
        # Llama with room for a tiny Llama-2-shaped SentencePiece vocabulary
        # (tests/export/tiny_tokenizers.llama2_tokenizer: 379 tokens, padded to 416)
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=416,
                             bos_token_id=1, eos_token_id=2)
        m = tf.LlamaForCausalLM(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, **common)
        m = tf.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, **common)
        m = tf.MistralForCausalLM(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, **common)
        m = tf.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             **common)
        m = tf.Qwen3ForCausalLM(cfg)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  sliding_window=8, **common)
        m = tf.Gemma3ForCausalLM(cfg)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              sliding_window=8, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, **common)
        m = tf.Gemma2ForCausalLM(cfg)
    elif family == "gemma3_mm":
        # the multimodal class (model_type "gemma3"): a tiny SigLIP tower beside the text one
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    sliding_window=8, **common)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=8)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                              eoi_token_index=VOCAB - 2)
        m = tf.Gemma3ForConditionalGeneration(cfg)
    elif family == "phi3":
        cfg = tf.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, **common)
        m = tf.Phi3ForCausalLM(cfg)
    elif family == "olmo2":
        cfg = tf.Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2,
                             **common)
        m = tf.Olmo2ForCausalLM(cfg)
    elif family == "granite":
        cfg = tf.GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               embedding_multiplier=4.0, residual_multiplier=0.5,
                               attention_multiplier=0.1, logits_scaling=2.0, **common)
        m = tf.GraniteForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)
        m = tf.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64,
                           word_embed_proj_dim=64, **common)
        m = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(family)
    return m.to(dtype).eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2", "opt"]
# every dense family lowbit declares (the family matrix, tests/families): FAMILIES plus
# Gemma-2, the multimodal Gemma-3 class, Phi-3 (Phi-4 shares its model type), OLMo-2, Granite
DENSE_FAMILIES = FAMILIES + ["gemma2", "gemma3_mm", "phi3", "olmo2", "granite"]


class SmallCNN(nn.Module):
    """Conv2d -> ReLU -> Conv2d -> pool -> Linear, for image-shaped inputs [N, 3, 16, 16]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def calib_ids(n=4, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq), generator=g)


def loop_over(ids):
    def forward_loop(model):
        for row in ids:
            model(row.unsqueeze(0))
    return forward_loop


def group_over(recipe, group_size: int) -> dict:
    """``{"group_size": group_size}`` for a recipe it changes, else ``{}`` (a group size that
    would change nothing is an error, see ``lowbit.recipes.takes_group_size``)."""
    from lowbit import recipes

    return {"group_size": group_size} if recipes.takes_group_size(recipe) else {}
