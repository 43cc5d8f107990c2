"""Text for calibration and evaluation: reading, tokenizing, splitting, batching.

Convention (the project's benchmarks use it): tokenize the whole file once; the first 80% of
the tokens are for calibration, the last 20% for held-out evaluation
(:func:`split_tokens`). Calibration draws seeded random windows from the first part
(:func:`calibration_batches`); evaluation scores consecutive windows of the second
(:func:`lowbit.eval.perplexity`).

>>> ids = tokenize(tok, read_text("sample:austen_pp"))                   # doctest: +SKIP
>>> calib, held_out = split_tokens(ids)                                  # doctest: +SKIP
>>> batches = calibration_batches(tok, "my_corpus.txt", n_samples=32)     # doctest: +SKIP
>>> lowbit.quantize(model, "int8", forward_loop_from_batches(batches))   # doctest: +SKIP

``"sample:NAME"`` names a text packaged with lowbit (:mod:`lowbit.data.samples`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from lowbit.data.samples import SAMPLE_PREFIX, is_sample_spec, sample_text, sample_text_names
from lowbit.errors import CalibrationError, ConfigError

_TEXT_SUFFIX = re.compile(r"\.(txt|text|md|rst|json|jsonl|csv|tsv|html?|xml|py|log|tex)$", re.I)


def _looks_like_path(s: str) -> bool:
    """A single 'word' with a path separator or a text-file suffix (``data/a.txt``)."""
    if not s or len(s) > 4096 or any(c.isspace() for c in s):
        return False
    return "/" in s or os.sep in s or bool(_TEXT_SUFFIX.search(s))


def read_text(text_or_path: "str | os.PathLike") -> str:
    """The text of a file, of a packaged sample, or ``text_or_path`` itself when it is
    literal text.

    A ``str`` ``"sample:NAME"`` is always the packaged sample ``NAME``
    (:func:`lowbit.data.sample_text`; ``"sample:austen_pp"``: *Pride and Prejudice*).
    A :class:`~pathlib.Path` (or any ``os.PathLike``) is always a file. A ``str`` is a file when
    such a file exists; a ``str`` without whitespace that looks like a path (it contains ``/``
    or ends in ``.txt``, ``.md``, ...) but names no file raises, so a typo in a path is never
    silently used as the text. Any other ``str`` is the text itself. Files are read as UTF-8
    (undecodable bytes replaced).

    Raises :class:`~lowbit.errors.ConfigError` when the file does not exist (the message
    names the packaged samples), is a folder, the sample is unknown, or the text is empty
    (or only whitespace).
    """
    if is_sample_spec(text_or_path):
        return sample_text(text_or_path)
    if isinstance(text_or_path, os.PathLike):
        p = Path(text_or_path)
    elif isinstance(text_or_path, str):
        s = text_or_path
        is_file = False
        if "\n" not in s and 0 < len(s) < 4096:
            try:
                is_file = Path(s).expanduser().is_file()
            except (OSError, ValueError):
                is_file = False
        if not is_file and not _looks_like_path(s):
            if not s.strip():
                raise ConfigError("the text is empty (expected a text file path or literal "
                                  "text with at least one non-blank character)")
            return s
        p = Path(s).expanduser()
    else:
        raise ConfigError(f"expected a text or a file path, got {type(text_or_path).__name__}")
    if p.is_dir():
        raise ConfigError(f"text file {p} is a folder, expected a text file")
    if not p.is_file():
        samples = ", ".join(f"'{SAMPLE_PREFIX}{n}'" for n in sample_text_names())
        raise ConfigError(f"text file {p} does not exist (give a text file, literal text, or "
                          f"a text packaged with lowbit: {samples})")
    body = p.read_text(encoding="utf-8", errors="replace")
    if not body.strip():
        raise ConfigError(f"text file {p} is empty (expected text to tokenize)")
    return body


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash identifying a Hugging Face fast tokenizer's vocabulary and rules, or ``None``
    when the tokenizer cannot be serialized (then nothing is cached for it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        spec = backend.to_str()
    except Exception:  # noqa: BLE001 - an unserializable tokenizer is simply not cached
        return None
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{spec}".encode()).hexdigest()


def _token_cache_path(tokenizer, text: str) -> Path | None:
    fp = tokenizer_fingerprint(tokenizer)
    if fp is None:
        return None
    from lowbit.data.models import cache_dir

    key = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return cache_dir() / "tokens" / f"{key[:32]}-{fp[:16]}.npy"


def tokenize(tokenizer, text: str, cache: bool = False) -> torch.Tensor:
    """Token ids ``LongTensor [n]`` of the whole ``text``, no special tokens added.

    ``tokenizer``: a Hugging Face tokenizer, or any callable
    ``tokenizer(text, add_special_tokens=False, return_attention_mask=False)`` returning
    ``{"input_ids": [...]}``. ``text`` is the text itself (use :func:`read_text` for files).

    ``cache=True`` stores the ids under ``<cache>/tokens/`` keyed by the SHA-256 of the text
    and of the tokenizer's serialized rules (fast tokenizers only), so a second call skips
    tokenizing (~0.7 s for 700k characters with SmolLM2's tokenizer).
    """
    if not isinstance(text, str):
        raise ConfigError(f"tokenize expects the text as a str, got {type(text).__name__} "
                          "(read files with lowbit.data.read_text)")
    path = _token_cache_path(tokenizer, text) if cache else None
    if path is not None and path.is_file():
        import numpy as np

        try:
            return torch.from_numpy(np.load(path).astype("int64"))
        except (OSError, ValueError):
            pass  # unreadable cache file: tokenize again and overwrite it
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if path is not None:
        import numpy as np

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, out.numpy().astype("int32"))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


def split_tokens(ids: torch.Tensor, calib_fraction: float = 0.8):
    """Split token ids ``[n]`` into ``(calib_ids [k], eval_ids [n - k])``, ``k =
    int(n * calib_fraction)``: the first part for calibration, the rest held out."""
    if not 0 < calib_fraction < 1:
        raise ConfigError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    ids = ids.reshape(-1)
    k = int(ids.numel() * calib_fraction)
    return ids[:k], ids[k:]


def calibration_batches(tokenizer, text_or_path, n_samples: int = 128, seq_len: int = 512,
                        seed: int = 0, split: str = "calib",
                        calib_fraction: float = 0.8, cache: bool = False) -> torch.Tensor:
    """Seeded random windows of a text's tokens: ``LongTensor [n_samples, seq_len]``.

    The text (a path, ``"sample:austen_pp"`` or literal text, see :func:`read_text`) is
    tokenized whole, then split
    with :func:`split_tokens`. ``split``: ``"calib"`` (the first ``calib_fraction`` of the
    tokens, default), ``"eval"`` (the rest) or ``"all"``. The windows start at uniformly
    random positions drawn from ``torch.Generator().manual_seed(seed)`` (same arguments, same
    windows); they may overlap, which is unavoidable when the split holds fewer than
    ``n_samples * seq_len`` tokens and allowed otherwise. Raises
    :class:`~lowbit.errors.CalibrationError` when the split is shorter than one window.
    ``cache``: passed to :func:`tokenize`.
    """
    ids = tokenize(tokenizer, read_text(text_or_path), cache=cache)
    if split == "all":
        part = ids
    elif split in ("calib", "eval"):
        part = split_tokens(ids, calib_fraction)[0 if split == "calib" else 1]
    else:
        raise ConfigError(f"split must be 'calib', 'eval' or 'all'; got {split!r}")
    if part.numel() < seq_len:
        raise CalibrationError(
            f"the {split} split of the text has {part.numel()} tokens (of {ids.numel()} in "
            f"all), fewer than one window of seq_len={seq_len}: use a longer text or a "
            "shorter seq_len")
    return windows_from_ids(part, n_samples, seq_len, seed)


def windows_from_ids(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0):
    """``n_samples`` seeded random windows of ``seq_len`` consecutive tokens of ``ids [n]``:
    ``LongTensor [n_samples, seq_len]`` (windows may overlap)."""
    if n_samples < 1 or seq_len < 1:
        raise ConfigError(f"n_samples and seq_len must be positive, got {n_samples} and "
                          f"{seq_len}")
    ids = ids.reshape(-1)
    if ids.numel() < seq_len:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than one window of "
                               f"{seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def batches_from_tensors(tensors: "torch.Tensor | Sequence[torch.Tensor]",
                         batch_size: int = 1) -> list[torch.Tensor]:
    """Group rows of token ids into batches: a list of ``LongTensor [b, L]``, ``b <=
    batch_size``.

    ``tensors``: one tensor ``[n, L]`` (or ``[L]``, one row), or a sequence of tensors each
    ``[L]`` or ``[k, L]``. Rows keep their order. Rows of different lengths cannot share a
    batch: with ``batch_size > 1`` they raise :class:`~lowbit.errors.ConfigError`, with
    ``batch_size == 1`` each row is its own batch ``[1, L_i]``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    rows: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"batch item {i} is a {type(t).__name__}, expected a tensor")
        if t.dim() == 1:
            rows.append(t)
        elif t.dim() == 2:
            rows.extend(t.unbind(0))
        else:
            raise ConfigError(f"batch item {i} has shape {tuple(t.shape)}, expected [L] or "
                              "[n, L] token ids")
    if not rows:
        return []
    if len({r.numel() for r in rows}) > 1:
        if batch_size > 1:
            raise ConfigError("rows of different lengths cannot share a batch: use "
                              "batch_size=1 or windows of one length")
        return [r.unsqueeze(0) for r in rows]
    stacked = torch.stack(rows)
    return list(stacked.split(batch_size))


def forward_loop_from_batches(batches: "torch.Tensor | Iterable", batch_size: int = 1,
                              progress: Callable[[int, int], None] | None = None):
    """A ``forward_loop(model)`` (what :func:`lowbit.quantize` takes) that runs ``batches``
    through the model under ``torch.no_grad()``.

    ``batches``:

    * ``LongTensor [n, L]`` (from :func:`calibration_batches`): split into batches
      ``[batch_size, L]`` (the last one smaller); ``[L]`` is one row;
    * a sequence of ``[L]`` tensors of one length: grouped into batches of ``batch_size``
      (:func:`batches_from_tensors`);
    * any other iterable: each item is one call, a tensor ``[b, L]`` (``[L]`` gets a batch
      dimension) or a dict of keyword arguments; ``batch_size`` is not used.

    Inputs are moved to the device of the model's first parameter; outputs are discarded; the
    model's train/eval mode is left as it is. ``progress(done, total)`` is called after each
    batch. The returned callable has the attribute ``n_batches``. Raises
    :class:`~lowbit.errors.CalibrationError` when there is no batch.
    """
    if isinstance(batches, torch.Tensor):
        calls: list = batches_from_tensors(batches, batch_size)
    else:
        items = list(batches)
        if items and all(isinstance(b, torch.Tensor) and b.dim() == 1 for b in items) \
                and len({b.numel() for b in items}) == 1:
            calls = batches_from_tensors(items, batch_size)
        else:
            calls = []
            for i, b in enumerate(items):
                if isinstance(b, torch.Tensor):
                    calls.append(b.unsqueeze(0) if b.dim() == 1 else b)
                elif isinstance(b, dict):
                    calls.append(b)
                else:
                    raise ConfigError(f"batch {i} is a {type(b).__name__}, expected a tensor "
                                      "of token ids or a dict of keyword arguments")
    if not calls:
        raise CalibrationError("no calibration batches (expected at least one row of token "
                               "ids)")

    def forward_loop(model):
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            for i, b in enumerate(calls):
                if isinstance(b, dict):
                    model(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()})
                else:
                    model(b.to(dev))
                if progress is not None:
                    progress(i + 1, len(calls))

    forward_loop.n_batches = len(calls)
    return forward_loop


DEMO_MODULES = ("collections", "argparse", "typing", "json", "pathlib", "functools",
                "itertools", "re", "subprocess", "inspect", "dataclasses", "logging",
                "unittest", "asyncio", "email", "http.client", "textwrap", "string", "csv",
                "datetime", "decimal", "fractions", "statistics", "shutil", "tempfile",
                "threading", "concurrent.futures", "urllib.parse", "xml.dom.minidom", "zipfile")


def default_demo_text(min_chars: int = 100_000) -> str:
    """A text every Python installation has: the docstrings of the standard-library modules
    in :data:`DEMO_MODULES` (module docstring, then the docstrings of its public names in
    sorted order), joined by blank lines.

    Deterministic for a given Python version (about 200k characters on CPython 3.11). A
    module that cannot be imported is skipped. Raises :class:`~lowbit.errors.ConfigError`
    when the result is shorter than ``min_chars`` characters.
    """
    parts = []
    for name in DEMO_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
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
        raise ConfigError(f"the standard library docstrings give only {len(text)} characters, "
                          f"fewer than {min_chars}")
    return text
