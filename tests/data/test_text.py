"""Reading text, tokenizing (and its cache), splitting, calibration windows, forward loops."""

import pytest
import torch

from lowbit.data import (batches_from_tensors, calibration_batches, default_demo_text,
                         forward_loop_from_batches, read_text, split_tokens, tokenize,
                         windows_from_ids)
from lowbit.errors import CalibrationError, ConfigError


class CharTokenizer:
    """Fake tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


class PositionTokenizer:
    """Fake tokenizer whose ids are the character positions: a window's ids say where it is."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(range(len(text)))}


def word_tokenizer():
    """A real (tiny) Hugging Face fast tokenizer: one token per letter or space."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)}
    vocab.update({"[UNK]": 26, " ": 27})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def test_read_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world")
    assert read_text(p) == "hello world"
    assert read_text(str(p)) == "hello world"
    assert read_text("literal text") == "literal text"
    assert read_text("word") == "word"
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_text(tmp_path / "e.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    # a str that looks like a path but names no file is an error, not the text "x/missing.txt"
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        read_text("austen_typo.txt")
    with pytest.raises(ConfigError, match="is a folder"):
        read_text(tmp_path)
    with pytest.raises(ConfigError, match="empty"):
        read_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_text(" \n\t ")


def test_tokenize_and_cache(tmp_path, monkeypatch):
    assert torch.equal(tokenize(CharTokenizer(), "ab"), torch.tensor([97, 98]))
    assert tokenize(CharTokenizer(), "ab").dtype == torch.long
    with pytest.raises(ConfigError, match="str"):
        tokenize(CharTokenizer(), tmp_path)
    # the cache: keyed by text and tokenizer, written under $LOWBIT_CACHE/tokens
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    tok = word_tokenizer()
    text = "the quick brown fox " * 50
    ref = tokenize(tok, text)
    assert ref.numel() == len(text)
    assert not (tmp_path / "cache").exists()  # cache=False writes nothing
    a = tokenize(tok, text, cache=True)
    files = list((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 1 and torch.equal(a, ref)
    calls = []
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, *a, **k: calls.append(1) or {"input_ids": []})
    b = tokenize(tok, text, cache=True)  # from the cache: the tokenizer is not called
    assert calls == [] and torch.equal(b, ref) and b.dtype == torch.long
    tokenize(tok, text + "x", cache=True)  # another text: tokenized again
    assert calls == [1]
    # a tokenizer without serializable rules is never cached
    tokenize(CharTokenizer(), "abc", cache=True)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 2


def test_split_and_windows():
    ids = torch.arange(1000)
    c, e = split_tokens(ids)
    assert c.numel() == 800 and e[0] == 800 and e.numel() == 200
    c, e = split_tokens(ids, 0.5)
    assert c.numel() == 500
    with pytest.raises(ConfigError, match="calib_fraction"):
        split_tokens(ids, 1.0)
    w = windows_from_ids(ids[:800], 16, 50, seed=3)
    assert w.shape == (16, 50)
    assert torch.equal(w, windows_from_ids(ids[:800], 16, 50, seed=3))
    assert not torch.equal(w, windows_from_ids(ids[:800], 16, 50, seed=4))
    assert int(w.max()) < 800
    assert bool(((w[:, 1:] - w[:, :-1]) == 1).all())  # contiguous windows
    with pytest.raises(CalibrationError, match="fewer than one window"):
        windows_from_ids(torch.arange(10), 2, 50)
    with pytest.raises(ConfigError, match="positive"):
        windows_from_ids(ids, 0, 50)


def test_calibration_batches_come_from_the_first_80_percent():
    text = "x" * 5000  # PositionTokenizer: token id == position, 5000 tokens
    b = calibration_batches(PositionTokenizer(), text, n_samples=64, seq_len=100, seed=1)
    assert b.shape == (64, 100) and b.dtype == torch.long
    assert int(b.max()) < 4000 and int(b.min()) >= 0
    assert bool(((b[:, 1:] - b[:, :-1]) == 1).all())
    assert torch.equal(b, calibration_batches(PositionTokenizer(), text, n_samples=64,
                                              seq_len=100, seed=1))
    assert not torch.equal(b, calibration_batches(PositionTokenizer(), text, n_samples=64,
                                                  seq_len=100, seed=2))
    e = calibration_batches(PositionTokenizer(), text, n_samples=8, seq_len=100, split="eval")
    assert int(e.min()) >= 4000 and int(e.max()) < 5000
    a = calibration_batches(PositionTokenizer(), text, n_samples=8, seq_len=100, split="all")
    assert a.shape == (8, 100)
    with pytest.raises(ConfigError, match="split"):
        calibration_batches(PositionTokenizer(), text, split="test")


def test_calibration_batches_short_text():
    # too short for 64 disjoint windows: overlapping windows, no error
    b = calibration_batches(PositionTokenizer(), "x" * 500, n_samples=64, seq_len=100)
    assert b.shape == (64, 100) and int(b.max()) < 400
    # too short for one window: a clear error
    with pytest.raises(CalibrationError, match="fewer than one window of seq_len=512"):
        calibration_batches(PositionTokenizer(), "x" * 600, n_samples=4, seq_len=512)
    with pytest.raises(ConfigError, match="empty"):
        calibration_batches(PositionTokenizer(), "   ", n_samples=4, seq_len=8)


def test_batches_from_tensors():
    x = torch.arange(20).reshape(5, 4)
    bs = batches_from_tensors(x, 2)
    assert [tuple(b.shape) for b in bs] == [(2, 4), (2, 4), (1, 4)]
    assert torch.equal(torch.cat(bs), x)
    bs = batches_from_tensors([x[0], x[1:3], x[3]], 3)
    assert [tuple(b.shape) for b in bs] == [(3, 4), (1, 4)]
    assert torch.equal(torch.cat(bs), x[:4])
    assert [tuple(b.shape) for b in batches_from_tensors(torch.arange(7))] == [(1, 7)]
    ragged = [torch.arange(3), torch.arange(5)]
    assert [tuple(b.shape) for b in batches_from_tensors(ragged, 1)] == [(1, 3), (1, 5)]
    with pytest.raises(ConfigError, match="different lengths"):
        batches_from_tensors(ragged, 2)
    with pytest.raises(ConfigError, match="shape"):
        batches_from_tensors([torch.zeros(2, 2, 2)])
    with pytest.raises(ConfigError, match="batch_size"):
        batches_from_tensors(x, 0)


class Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x=None, input_ids=None):
        x = x if x is not None else input_ids
        self.seen.append((tuple(x.shape), torch.is_grad_enabled()))


def test_forward_loop():
    spy = Spy()
    done = []
    loop = forward_loop_from_batches(torch.arange(12).reshape(3, 4), batch_size=2,
                                     progress=lambda i, n: done.append((i, n)))
    assert loop.n_batches == 2
    loop(spy)
    assert spy.seen == [((2, 4), False), ((1, 4), False)]
    assert done == [(1, 2), (2, 2)]
    # rows of one length are grouped by batch_size; ready batches are one call each
    spy = Spy()
    forward_loop_from_batches([torch.arange(4)] * 5, batch_size=2)(spy)
    assert [s for s, _ in spy.seen] == [(2, 4), (2, 4), (1, 4)]
    spy = Spy()
    forward_loop_from_batches([torch.zeros(3, 4, dtype=torch.long), torch.arange(6)])(spy)
    assert [s for s, _ in spy.seen] == [(3, 4), (1, 6)]
    spy = Spy()
    forward_loop_from_batches([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}])(spy)
    assert [s for s, _ in spy.seen] == [(1, 4)]
    with pytest.raises(CalibrationError):
        forward_loop_from_batches([])
    with pytest.raises(ConfigError, match="expected a tensor"):
        forward_loop_from_batches(["text"])


def test_forward_loop_runs_a_tiny_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(tuple(o.logits.shape)))
    batches = calibration_batches(PositionTokenizer(), "x" * 250, n_samples=3, seq_len=16)
    forward_loop_from_batches(batches, batch_size=2)(model)
    assert calls == [(2, 16, 256), (1, 16, 256)]


def test_demo_text_is_deterministic_and_long():
    a = default_demo_text()
    assert len(a) > 100_000 and a == default_demo_text()
    assert a.startswith(__import__("collections").__doc__.strip()[:40])
