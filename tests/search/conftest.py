"""A tiny Llama trained for a few seconds on a seeded Markov chain (a trained model: its
loss is near a minimum, as the sensitivity estimate assumes), and its calibration loop."""

import copy

import pytest
import torch

VOCAB, HIDDEN, INTER = 64, 64, 128


def markov_ids(n: int, length: int, seed: int) -> torch.Tensor:
    """``[n, length]`` token ids from a fixed random, peaked transition matrix."""
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(VOCAB, VOCAB, generator=g) * 3.0
    probs = logits.softmax(-1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(probs[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


@pytest.fixture(scope="session")
def trained_state():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg)
    data = markov_ids(256, 32, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = data[(step * 16) % 256:(step * 16) % 256 + 16]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_model(trained_state):
    """A fresh copy of the trained tiny Llama (eval mode)."""
    import transformers as tf

    cfg, state = trained_state
    model = tf.LlamaForCausalLM(copy.deepcopy(cfg))
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture
def calib_loop():
    from lowbit.data import forward_loop_from_batches

    return forward_loop_from_batches(markov_ids(8, 32, seed=1), batch_size=4)


def make_sensitive(model, layer: int = 1, factor: float = 30.0) -> str:
    """Give ``model.layers[layer].mlp.down_proj`` outlier input columns without changing the
    function (the matching rows of ``up_proj`` are divided by ``factor``); returns its name."""
    mlp = model.model.layers[layer].mlp
    cols = torch.tensor([3, 40, 77, 101])
    with torch.no_grad():
        mlp.down_proj.weight[:, cols] *= factor
        mlp.up_proj.weight[cols, :] /= factor
    return f"model.layers.{layer}.mlp.down_proj"
