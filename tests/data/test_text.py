"""Reading text, splitting tokens, calibration windows, forward loops."""

import pytest
import torch

from lowbit.data import (calibration_batches, default_demo_text, forward_loop_from_batches,
                         read_text, split_tokens, windows_from_ids)
from lowbit.errors import CalibrationError, ConfigError


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_read_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world")
    assert read_text(p) == "hello world"
    assert read_text("literal text") == "literal text"
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_text(tmp_path / "e.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(tmp_path / "missing.txt")


def test_split_and_windows():
    ids = torch.arange(1000)
    c, e = split_tokens(ids)
    assert c.numel() == 800 and e[0] == 800
    w = windows_from_ids(c, 16, 50, seed=3)
    assert w.shape == (16, 50)
    assert torch.equal(w, windows_from_ids(c, 16, 50, seed=3))
    assert int(w.max()) < 800
    assert bool(((w[:, 1:] - w[:, :-1]) == 1).all())  # contiguous windows
    with pytest.raises(CalibrationError, match="fewer than one window"):
        windows_from_ids(torch.arange(10), 2, 50)


def test_calibration_batches_come_from_the_first_80_percent():
    text = "".join(chr(65 + i % 26) for i in range(5000))
    b = calibration_batches(CharTokenizer(), text, n_samples=8, seq_len=64)
    assert b.shape == (8, 64)
    e = calibration_batches(CharTokenizer(), text, n_samples=8, seq_len=64, split="eval")
    assert not torch.equal(b, e)


def test_forward_loop():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))

    loop = forward_loop_from_batches(torch.arange(12).reshape(3, 4), batch_size=2)
    loop(Spy())
    assert seen == [(2, 4), (1, 4)]
    with pytest.raises(CalibrationError):
        forward_loop_from_batches([])


def test_demo_text_is_deterministic_and_long():
    a = default_demo_text()
    assert len(a) > 100_000 and a == default_demo_text()
