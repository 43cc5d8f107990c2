"""Perplexity windows and the model/baseline comparison, on a tiny seeded Llama."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError
from lowbit.eval import compare, perplexity
from lowbit.eval.perplexity import _windows
from tests.tiny_models import build


def test_perplexity_is_exp_mean_nll():
    m = build("llama")
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    r = perplexity(m, ids, seq_len=32, n_windows=1)
    x = ids[:32][None]
    logp = F.log_softmax(m(x).logits[0, :-1].float(), -1)
    nll = -logp.gather(-1, x[0, 1:, None]).mean()
    assert r["tokens"] == 31 and r["windows"] == 1
    assert math.isclose(r["ppl"], math.exp(float(nll)), rel_tol=1e-5)


def test_windows_and_stride():
    assert _windows(100, 32, 32, None) == [(0, 32, 1), (32, 64, 1), (64, 96, 1)]
    # sliding: only tokens beyond the previous window's end are scored
    w = _windows(100, 32, 16, None)
    assert w[0] == (0, 32, 1) and w[1] == (16, 48, 16)
    m = build("llama")
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    r = perplexity(m, ids, seq_len=32, stride=16, n_windows=None)
    assert r["tokens"] == 31 + 16 * (len(w) - 1)


def test_errors():
    m = build("llama")
    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(m, torch.zeros(10, dtype=torch.long), seq_len=32)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(m, torch.zeros(100, dtype=torch.long), seq_len=32, stride=64)


def test_compare_identical_models():
    m = build("llama")
    ids = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(0))
    r = compare(m, m, ids, seq_len=32, n_windows=2)
    assert abs(r["mean_kl"]) < 1e-6 and r["top1_agreement"] == 1.0 and r["delta_pct"] == 0
