"""perplexity() and compare() against hand computations, on a tiny seeded random Llama."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError
from lowbit.eval import compare, perplexity
from lowbit.eval.perplexity import _windows

VOCAB = 256


def tiny_llama(seed=0, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(0))


def token_nll(model, window: torch.Tensor) -> torch.Tensor:
    """NLL (nats) of each next token of a window ``[L]``, one position at a time: ``[L - 1]``."""
    with torch.no_grad():
        logits = model(window[None]).logits[0].double()
    out = []
    for j in range(window.numel() - 1):
        z = logits[j]
        out.append(torch.logsumexp(z, 0) - z[window[j + 1]])
    return torch.stack(out)


def test_one_window_is_exp_of_mean_nll(model, ids):
    r = perplexity(model, ids, seq_len=32, n_windows=1)
    nll = token_nll(model, ids[:32]).mean()
    assert r["tokens"] == 31 and r["windows"] == 1 and r["seq_len"] == 32
    assert math.isclose(r["nll"], float(nll), rel_tol=1e-5)
    assert math.isclose(r["ppl"], math.exp(float(nll)), rel_tol=1e-5)
    # a random model is near uniform over the vocabulary
    assert 0.5 * VOCAB < r["ppl"] < 2 * VOCAB


def test_non_overlapping_windows(model, ids):
    r = perplexity(model, ids, seq_len=64, n_windows=3)
    per = [token_nll(model, ids[s:s + 64]) for s in (0, 64, 128)]
    assert r["tokens"] == 3 * 63 and r["windows"] == 3
    assert math.isclose(r["nll"], float(torch.cat(per).mean()), rel_tol=1e-5)
    # n_windows caps; None takes every full window (300 // 64 = 4)
    assert perplexity(model, ids, seq_len=64, n_windows=None)["windows"] == 4
    assert perplexity(model, ids, seq_len=64, n_windows=100)["windows"] == 4
    # stride == seq_len is the default
    assert perplexity(model, ids, seq_len=64, n_windows=3, stride=64)["nll"] == r["nll"]


def test_batch_size_does_not_change_the_result(model, ids):
    a = perplexity(model, ids, seq_len=32, n_windows=5)
    b = perplexity(model, ids, seq_len=32, n_windows=5, batch_size=2)
    c = perplexity(model, ids, seq_len=32, n_windows=5, batch_size=8)
    assert a["tokens"] == b["tokens"] == c["tokens"] == 5 * 31
    assert math.isclose(a["nll"], b["nll"], rel_tol=1e-5)
    assert math.isclose(a["nll"], c["nll"], rel_tol=1e-5)


def test_non_overlapping_window_bounds():
    assert _windows(100, 32, 32, None) == [(0, 32, 1), (32, 64, 1), (64, 96, 1)]
    assert _windows(100, 32, 32, 2) == [(0, 32, 1), (32, 64, 1)]
    assert _windows(31, 32, 32, None) == []


@pytest.mark.parametrize("n,seq_len,stride", [(100, 32, 16), (100, 32, 20), (300, 64, 1),
                                              (95, 32, 31), (64, 32, 31), (200, 48, 47)])
def test_sliding_windows_score_every_token_once(n, seq_len, stride):
    wins = _windows(n, seq_len, stride, None)
    scored = [s + j for s, e, first in wins for j in range(first, e - s)]
    last_end = wins[-1][1]
    assert scored == list(range(1, last_end))  # each token after the first exactly once
    for s, e, first in wins[1:]:
        assert first >= seq_len - stride  # context of at least seq_len - stride tokens
    assert all(e - s == seq_len for s, e, _ in wins)


def test_sliding_window_value(model, ids):
    """stride 16, seq_len 32 on 80 tokens: windows at 0, 16, 32, 48; the first scores its 31
    next tokens, each later one only its last 16."""
    x = ids[:80]
    r = perplexity(model, x, seq_len=32, stride=16, n_windows=None)
    assert r["windows"] == 4 and r["tokens"] == 31 + 3 * 16 == 79 and r["stride"] == 16
    parts = [token_nll(model, x[0:32])]
    for s in (16, 32, 48):
        parts.append(token_nll(model, x[s:s + 32])[-16:])
    assert math.isclose(r["nll"], float(torch.cat(parts).mean()), rel_tol=1e-5)
    # more context can only be compared, not predicted, for a random model: just differ
    assert r["nll"] != perplexity(model, x, seq_len=32, n_windows=None)["nll"]


def test_mode_grad_and_progress(ids):
    m = tiny_llama()
    m.train()
    seen = []
    m.register_forward_hook(lambda mod, i, o: seen.append((mod.training,
                                                           torch.is_grad_enabled())))
    prog = []
    perplexity(m, ids, seq_len=32, n_windows=3, batch_size=2,
               progress=lambda d, t: prog.append((d, t)))
    assert seen == [(False, False)] * 2 and prog == [(2, 3), (3, 3)]
    assert m.training  # restored


def test_bfloat16_model_and_plain_logits_module(ids):
    m16 = tiny_llama(dtype=torch.bfloat16)
    r = perplexity(m16, ids, seq_len=32, n_windows=2)
    assert math.isfinite(r["ppl"]) and r["tokens"] == 62

    class Bare(torch.nn.Module):  # returns logits directly, no .logits attribute
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, x):
            return self.emb(x)

    bare = Bare()
    r = perplexity(bare, ids, seq_len=16, n_windows=1)
    with torch.no_grad():
        logp = F.log_softmax(bare.emb(ids[:15]).double(), -1)
    nll = -logp.gather(-1, ids[1:16, None]).mean()
    assert math.isclose(r["nll"], float(nll), rel_tol=1e-5)


def test_errors(model):
    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(model, torch.zeros(10, dtype=torch.long), seq_len=32)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, torch.zeros(100, dtype=torch.long), seq_len=32, stride=64)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, torch.zeros(100, dtype=torch.long), seq_len=32, stride=0)
    with pytest.raises(ConfigError, match="integer token ids"):
        perplexity(model, torch.zeros(100), seq_len=32)
    with pytest.raises(ConfigError, match="context of 256"):
        perplexity(model, torch.zeros(1000, dtype=torch.long), seq_len=512)
    with pytest.raises(ConfigError, match="n_windows"):
        perplexity(model, torch.zeros(100, dtype=torch.long), seq_len=32, n_windows=0)
    with pytest.raises(ConfigError, match="fewer than one window"):
        compare(model, model, torch.zeros(10, dtype=torch.long), seq_len=32)


def test_compare_identical_models(model, ids):
    r = compare(model, model, ids, seq_len=32, n_windows=2)
    assert r["mean_kl"] == 0.0 and r["top1_agreement"] == 1.0 and r["delta_pct"] == 0
    assert r["tokens"] == 62 and r["windows"] == 2
    twin = copy.deepcopy(model)
    r = compare(twin, model, ids, seq_len=32, n_windows=2)
    assert abs(r["mean_kl"]) < 1e-6 and r["top1_agreement"] == 1.0


def test_compare_different_models(model, ids):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    r = compare(other, model, ids, seq_len=32, n_windows=3)
    assert math.isclose(r["ppl"], perplexity(other, ids, seq_len=32, n_windows=3)["ppl"],
                        rel_tol=1e-6)
    assert math.isclose(r["baseline_ppl"],
                        perplexity(model, ids, seq_len=32, n_windows=3)["ppl"], rel_tol=1e-6)
    assert math.isclose(r["delta_pct"], 100 * (r["ppl"] / r["baseline_ppl"] - 1), rel_tol=1e-9)
    # KL(baseline || model) and top-1 agreement by hand
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for s in (0, 32, 64):
            x = ids[s:s + 32][None]
            lb = F.log_softmax(model(x).logits[0, :-1].double(), -1)
            lm = F.log_softmax(other(x).logits[0, :-1].double(), -1)
            kl += float((lb.exp() * (lb - lm)).sum())
            agree += int((lb.argmax(-1) == lm.argmax(-1)).sum())
            n += 31
    assert r["mean_kl"] > 0
    assert math.isclose(r["mean_kl"], kl / n, rel_tol=1e-3)
    assert r["top1_agreement"] == agree / n
    assert 0 <= r["top1_agreement"] <= 1
