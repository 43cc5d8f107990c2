"""Text for calibration and evaluation: reading, tokenizing, splitting, batching.

Convention (as the project's benchmarks use it): tokenize the whole file once; the first 80%
of the tokens are for calibration, the last 20% for held-out evaluation.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

from lowbit.errors import CalibrationError, ConfigError


def read_text(text_or_path: "str | os.PathLike") -> str:
    """The contents of a file path, or ``text_or_path`` itself when it is literal text."""
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in
                                          text_or_path and len(text_or_path) < 4096 and
                                          Path(text_or_path).suffix and
                                          Path(text_or_path).exists()):
        p = Path(text_or_path)
        if not p.is_file():
            raise ConfigError(f"text file {p} does not exist")
        body = p.read_text(encoding="utf-8", errors="replace")
        if not body.strip():
            raise ConfigError(f"text file {p} is empty")
        return body
    if not str(text_or_path).strip():
        raise ConfigError("the text is empty")
    return str(text_or_path)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids ``LongTensor [n]`` of ``text`` (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_tokens(ids: torch.Tensor, calib_fraction: float = 0.8):
    """``(calibration ids, evaluation ids)``: the first ``calib_fraction`` and the rest."""
    if not 0 < calib_fraction < 1:
        raise ConfigError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    k = int(ids.numel() * calib_fraction)
    return ids[:k], ids[k:]


def calibration_batches(tokenizer, text_or_path, n_samples: int = 128, seq_len: int = 512,
                        seed: int = 0, split: str = "calib",
                        calib_fraction: float = 0.8) -> torch.Tensor:
    """``LongTensor [n_samples, seq_len]``: seeded random windows of the calibration split.

    ``split``: ``"calib"`` (first ``calib_fraction`` of the tokens), ``"eval"`` (the rest) or
    ``"all"``. Windows may overlap when the split is shorter than ``n_samples * seq_len``.
    """
    ids = tokenize(tokenizer, read_text(text_or_path))
    if split == "all":
        part = ids
    elif split in ("calib", "eval"):
        part = split_tokens(ids, calib_fraction)[0 if split == "calib" else 1]
    else:
        raise ConfigError(f"split must be calib, eval or all; got {split!r}")
    return windows_from_ids(part, n_samples, seq_len, seed)


def windows_from_ids(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0):
    """``n_samples`` seeded random windows of ``seq_len`` tokens from ``ids`` (``[n, L]``)."""
    if n_samples < 1 or seq_len < 1:
        raise ConfigError("n_samples and seq_len must be positive")
    if ids.numel() < seq_len:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than one window of "
                               f"{seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def forward_loop_from_batches(batches: "torch.Tensor | Iterable", batch_size: int = 1,
                              progress: Callable[[int, int], None] | None = None):
    """A ``forward_loop(model)`` that runs ``batches`` through the model under no_grad.

    ``batches``: ``LongTensor [n, L]`` (split into batches of ``batch_size``) or an iterable
    of model inputs (tensors or dicts of keyword arguments). ``progress(done, total)`` is
    called after each batch.
    """
    if isinstance(batches, torch.Tensor):
        if batches.dim() == 1:
            batches = batches.unsqueeze(0)
        items = list(batches.split(batch_size))
    else:
        items = list(batches)
    if not items:
        raise CalibrationError("no calibration batches")

    def forward_loop(model):
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            for i, b in enumerate(items):
                if isinstance(b, dict):
                    model(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()})
                else:
                    model(b.to(dev))
                if progress is not None:
                    progress(i + 1, len(items))

    forward_loop.n_batches = len(items)
    return forward_loop


DEMO_MODULES = ("collections", "argparse", "typing", "json", "pathlib", "functools",
                "itertools", "re", "subprocess", "inspect", "dataclasses", "logging",
                "unittest", "asyncio", "email", "http.client", "textwrap", "string", "csv",
                "datetime", "decimal", "fractions", "statistics", "shutil", "tempfile",
                "threading", "concurrent.futures", "urllib.parse", "xml.dom.minidom", "zipfile")


def default_demo_text(min_chars: int = 100_000) -> str:
    """Docstrings of a fixed list of standard-library modules, concatenated in order.

    Every Python installation has this text, so the demo needs no files; at least
    ``min_chars`` characters (a little over 100k by default).
    """
    parts = []
    for name in DEMO_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
    text = "\n\n".join(p for p in parts if p)
    if len(text) < min_chars:
        raise ConfigError(f"the standard library docstrings give only {len(text)} characters")
    return text
