"""Shared pieces of the exporters: the registry, atomic output folders, and weight codes.

Every exporter is a function ``export(model, out_dir: Path, **options) -> None`` that writes
into ``out_dir`` (a fresh temporary folder); :func:`save` renames it into place only when the
exporter returned, so a crash leaves the previous result or nothing. Exporters read state and
config only: they never run a forward pass.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from torch import nn

from lowbit._fs import umask  # noqa: F401  (re-exported)
from lowbit.core import QTensor, quantize
from lowbit.errors import CheckpointError, ConfigError
from lowbit.nn.modules import QuantMixin

# format name -> "module:function", imported on first use
_EXPORTERS: dict[str, str] = {
    "lowbit": "lowbit.export.native:export",
    "compressed-tensors": "lowbit.export.compressed_tensors:export",
    "gguf": "lowbit.export.gguf:export",
    "onnx": "lowbit.export.onnx_qdq:export",
}


def register_exporter(name: str, target: str) -> None:
    """Register an exporter ``"package.module:function"`` under format ``name``."""
    _EXPORTERS[name] = target


def exporter_names() -> list[str]:
    """Names of the export formats."""
    return list(_EXPORTERS)


def get_exporter(name: str) -> Callable:
    """The export function of format ``name`` (ConfigError naming the choices if unknown)."""
    if name not in _EXPORTERS:
        raise ConfigError(f"unknown export format {name!r}; expected one of: "
                          f"{', '.join(_EXPORTERS)}")
    mod, fn = _EXPORTERS[name].split(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        raise ConfigError(f"export format {name!r} is not available: {e}") from None


def _apply_umask(root: Path) -> None:
    """Give ``root`` and every folder under it mode ``0o777 & ~umask``, every file
    ``0o666 & ~umask``: mkdtemp makes 0700 and safetensors (0.8) writes 0600 files."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            if not os.path.islink(os.path.join(d, n)):
                os.chmod(os.path.join(d, n), 0o777 & ~mask)
        for n in files:
            if not os.path.islink(os.path.join(d, n)):
                os.chmod(os.path.join(d, n), 0o666 & ~mask)


@contextmanager
def atomic_dir(out_dir: "str | os.PathLike", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; rename it to ``out_dir`` on success.

    An existing ``out_dir`` is an error unless ``overwrite``; then it is replaced only after
    the new one is complete. On an exception (``KeyboardInterrupt`` and ``SystemExit``
    included: the CLI turns SIGTERM into one) the temporary folder is removed. Before the
    rename, the folders and files in it get the modes the umask gives (0755 and 0644 under
    umask 022), as ``mkdir`` and ``open`` would, whatever wrote them.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose a new folder or overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        _apply_umask(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weight_qtensor(module: QuantMixin) -> QTensor | None:
    """The quantized weight of ``module`` as a QTensor over its 2-D ``[out, in]`` view.

    Uses the quantizer's fixed scales (GPTQ/AWQ/loaded) when it has them, otherwise the
    scales the fake-quantized model computes, so ``dequantize`` of the result equals the
    module's ``quantized_weight()`` bit for bit. None when the weight is not quantized.
    """
    q = module.weight_quantizer
    if not q.is_enabled:
        return None
    w = module.weight_2d().detach()
    if q.scale is not None:
        return quantize(w, q.spec, scale=q.scale, zero_point=q.zero_point,
                        global_scale=q.global_scale)
    return quantize(w, q.spec)


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantMixin]]:
    """``(name, module)`` for every quantized module of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QuantMixin):
            yield name, m


def save(model: nn.Module, out_dir: "str | os.PathLike", format: str = "lowbit",
         overwrite: bool = False, **options) -> Path:
    """Write ``model`` to ``out_dir`` in ``format`` atomically; returns the folder.

    Formats: ``lowbit`` (native packed safetensors, reloadable with ``lowbit.load``),
    ``compressed-tensors`` (vLLM / transformers), ``gguf`` (llama.cpp), ``onnx`` (QDQ).
    Options are the exporter's (e.g. ``max_shard_size``, ``tokenizer``); an option the format
    does not take raises :class:`~lowbit.errors.ConfigError` naming it and the options it takes,
    before anything is written.
    """
    fn = get_exporter(format)
    with atomic_dir(out_dir, overwrite) as tmp:
        fn(model, tmp, **options)
    return Path(out_dir)
