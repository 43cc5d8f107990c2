"""The packaged real model (SmolLM2-135M): load, cache, and baseline perplexity."""

import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def real():
    from lowbit.data import load_model

    return load_model()


def test_cached_load_is_fast(real):
    from lowbit.data import load_model

    t = time.perf_counter()
    m, _ = load_model()
    assert time.perf_counter() - t < 5
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(m(x).logits, real[0](x).logits)


@pytest.mark.skipif(not (DATA / "austen_pp.txt").exists(), reason="shared data not present")
def test_baseline_perplexity(real):
    from lowbit.data import read_text, split_tokens, tokenize
    from lowbit.eval import perplexity

    model, tok = real
    ids = tokenize(tok, read_text(DATA / "austen_pp.txt"))
    _, ev = split_tokens(ids)
    r = perplexity(model, ev, seq_len=512, n_windows=4)
    print("held-out austen ppl, 4 windows:", r["ppl"])
    assert 20 < r["ppl"] < 45
