"""Tiny seeded transformers models built from configs (random weights), and a small CNN."""

import torch
from torch import nn

VOCAB = 128


def build(family: str, dtype=torch.float32):
    """A tiny causal LM of ``family`` with seeded random weights, in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB)
    if family == "llama":
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
