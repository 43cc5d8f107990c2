"""Reading checkpoints safely: safetensors only (never pickle), every tensor checked.

A truncated or corrupt shard, a tensor with the wrong dtype or shape, or a missing scale is
a :class:`~lowbit.errors.CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from lowbit import formats
from lowbit.core import Layout, QuantSpec
from lowbit.errors import CheckpointError, ConfigError

META = "lowbit_checkpoint.json"
# stored dtype of weight scales per scale format (e4m3/e8m0 scales as their uint8 codes)
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "e4m3": torch.uint8, "e8m0": torch.uint8}


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (from the index when sharded)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        return [path / f for f in sorted(set(wm.values()))]
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors (nor an index) in this folder")
    return [single]


def read_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of ``files`` and the file each came from."""
    out: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f} is missing")
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
                    where[k] = f
        except CheckpointError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise CheckpointError(f"{f}: cannot read as safetensors ({str(e).splitlines()[0]})"
                                  "; the file is truncated or corrupt") from None
    return out, where


def _expect(tensors, where, key, dtype, shape, path) -> None:
    t = tensors.get(key)
    if t is None:
        raise CheckpointError(f"{path}: tensor {key!r} is missing")
    if t.dtype != dtype:
        raise CheckpointError(f"{where[key]}: tensor {key!r} has dtype {t.dtype}, expected "
                              f"{dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{where[key]}: tensor {key!r} has shape {list(t.shape)}, "
                              f"expected {list(shape)}")


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, Path]]:
    """``(metadata, tensors, file of each tensor)`` of a native lowbit checkpoint, every
    quantized tensor checked against the metadata (codes, scales, zero-points, global
    scales, calibrated statistics)."""
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a lowbit checkpoint: {META} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != "lowbit" or \
            meta.get("version") != 1:
        raise CheckpointError(f"{meta_file}: not a lowbit checkpoint of version 1 (format "
                              f"{meta.get('format')!r}, version {meta.get('version')!r})")
    for k in ("quantized", "tied"):
        if not isinstance(meta.get(k), dict):
            raise CheckpointError(f"{meta_file}: {k!r} is missing or not a mapping")
    tensors, where = read_tensors(shard_files(path))
    for name, qm in meta.get("quantized", {}).items():
        key = f"{name}.weight"
        if not isinstance(qm, dict) or "spec" not in qm or \
                not isinstance(qm.get("shape"), list) or len(qm["shape"]) < 1:
            raise CheckpointError(f"{meta_file}: quantized[{name!r}] needs a spec and a shape")
        try:
            spec = QuantSpec.parse(qm["spec"], f"{meta_file}: {name}")
            shape = tuple(int(n) for n in qm["shape"])
            sshape = Layout(spec, shape).natural_shape()
        except (ConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_file}: quantized[{name!r}]: {e}") from None
        if spec.format.startswith("gguf_"):  # ggml's bytes hold codes and every scale
            from lowbit.formats.ggml_blocks import block

            b = block(spec.format[5:].upper())
            if len(shape) != 2 or shape[1] % b.super:
                raise CheckpointError(f"{meta_file}: quantized[{name!r}]: shape "
                                      f"{list(shape)} is not [out, k*{b.super}]")
            _expect(tensors, where, f"{key}.codes", torch.uint8,
                    (shape[0], shape[1] // b.super * b.type_size), path)
            continue
        bits = spec.element_format.bits
        _expect(tensors, where, f"{key}.codes", torch.uint8,
                (*shape[:-1], formats.packed_size(shape[-1], bits)), path)
        _expect(tensors, where, f"{key}.scale", SCALE_DTYPES[spec.scale_format], sshape, path)
        if not spec.symmetric:
            zshape = (math.prod(sshape[:-1]), formats.packed_size(sshape[-1], bits)) \
                if sshape else (1, formats.packed_size(1, bits))
            _expect(tensors, where, f"{key}.zero_point", torch.uint8, zshape, path)
        bf = spec.block_format
        if bf is not None and bf.global_scale:
            _expect(tensors, where, f"{key}.global_scale", torch.float32, (1,), path)
        if math.prod(shape) == 0:
            raise CheckpointError(f"{path}: tensor {key!r} has an empty shape {list(shape)}")
    for key, t in tensors.items():
        if key.endswith((".amax", ".amin")) and t.dtype != torch.float32:
            raise CheckpointError(f"{where[key]}: tensor {key!r} has dtype {t.dtype}, expected "
                                  "torch.float32")
    return meta, tensors, where


def check_against_model(tensors: dict[str, torch.Tensor], where: dict[str, Path],
                        expected: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``tensors`` that ``expected`` (a state dict) names must have its shape
    and dtype; a CheckpointError names the first that does not."""
    for k, t in tensors.items():
        e = expected.get(k)
        if e is None:
            continue
        if tuple(t.shape) != tuple(e.shape):
            raise CheckpointError(f"{where[k]}: tensor {k!r} has shape {list(t.shape)}, "
                                  f"expected {list(e.shape)}")
        if t.dtype != e.dtype:
            raise CheckpointError(f"{where[k]}: tensor {k!r} has dtype {t.dtype}, expected "
                                  f"{e.dtype}")
