"""The source of a streamed quantization: a transformers model folder read piece by piece.

* :class:`SafetensorsSource` indexes every tensor of the folder's safetensors files (from
  ``model.safetensors.index.json``, ``model.safetensors`` or every ``*.safetensors``) by
  parsing their JSON headers, and reads one tensor at a time straight from its byte range
  into a fresh buffer (``readinto``: no memory map, so no file pages count towards the
  process's memory, and nothing but safetensors is ever read: no pickle).
* :func:`build_skeleton` builds the model from ``config.json`` with every parameter on the
  meta device (no memory, no initialisation); buffers (rotary frequencies...) are real.
* :func:`materialize` loads the parameters (and stored buffers) of one submodule from the
  source; :func:`release` sends them back to the meta device. Tied parameters (an
  ``lm_head`` sharing ``embed_tokens``) stay tied.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import CheckpointError, ConfigError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20  # bytes of a safetensors JSON header


class SafetensorsSource:
    """Every tensor of a folder of safetensors files (or of the given ``files``), read one
    at a time.

    Attributes: ``path``, ``files`` (list of Paths), ``entries`` (name -> ``(file, offset,
    nbytes, dtype, shape)``), ``nbytes`` (total tensor bytes). Raises
    :class:`~lowbit.errors.CheckpointError` for a missing, truncated or malformed file.
    """

    def __init__(self, path: "str | os.PathLike", files: "list[Path] | None" = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a model folder")
        self.files = [Path(f) for f in files] if files is not None else self._files()
        self.entries: dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]] = {}
        for f in self.files:
            self._index(f)
        self.nbytes = sum(e[2] for e in self.entries.values())

    def _files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                names = sorted(set(wm.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = [self.path / n for n in names]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index} names shard {f.name}, which is missing")
            return files
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no safetensors weights (model.safetensors, "
                                  "an index, or *.safetensors) in this folder")
        return files

    def _index(self, f: Path) -> None:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{f}: not a safetensors file (header of {n} bytes in a "
                                      f"file of {size})")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{f}: corrupt safetensors header (not a mapping)")
        base = 8 + n
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                b, end = (int(v) for v in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{f}: tensor {name!r} has a malformed header entry "
                                      f"({err!r})") from None
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - b != nbytes or b < 0 or base + end > size:
                raise CheckpointError(f"{f}: tensor {name!r} ({e['dtype']} {list(shape)}) does "
                                      f"not fit its byte range [{b}, {end}) in a file of "
                                      f"{size} bytes (truncated?)")
            if name in self.entries:
                raise CheckpointError(f"{f}: tensor {name!r} is also in "
                                      f"{self.entries[name][0].name}")
            self.entries[name] = (f, base + b, nbytes, dtype, shape)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self) -> list[str]:
        """Names of the stored tensors."""
        return list(self.entries)

    def read(self, name: str, dtype: torch.dtype | None = None,
             device: "str | torch.device" = "cpu") -> torch.Tensor:
        """The stored tensor ``name`` (its own dtype and shape, or cast to floating
        ``dtype``), on ``device``."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        f, off, nbytes, stored, shape = self.entries[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            with open(f, "rb", buffering=0) as fh:
                fh.seek(off)
                got = 0
                while got < nbytes:
                    k = fh.readinto(view[got:])
                    if not k:
                        raise CheckpointError(f"{f}: tensor {name!r} is truncated")
                    got += k
        t = buf.view(stored).reshape(shape)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if torch.device(device).type != "cpu" else t

    def fingerprint(self) -> list[list]:
        """``[name, size, mtime_ns]`` of every file: a changed source fails to resume."""
        out = []
        for f in self.files:
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
        return out


# --- the model skeleton -------------------------------------------------------------------------
@contextlib.contextmanager
def _params_on_meta():
    """Parameters registered inside go to the meta device (buffers stay real)."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        old(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"),
                                                  requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def resolve_dtype(config, dtype: "torch.dtype | str | None") -> torch.dtype:
    """``dtype`` (a torch dtype or its name), else the config's ``dtype``/``torch_dtype``,
    else float32."""
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) \
            or torch.float32
    if isinstance(dtype, str):
        d = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(d, torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16...)")
        dtype = d
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ConfigError(f"dtype must be a floating dtype (float32, bfloat16, float16), got "
                          f"{dtype}")
    return dtype


def build_skeleton(path: "str | os.PathLike", dtype: "torch.dtype | str | None" = None) \
        -> nn.Module:
    """The causal LM of ``path/config.json`` with its parameters on the meta device (no
    memory, no initialisation), in ``dtype`` (default: the config's), in eval mode. Its
    ``generation_config`` is the folder's when it has one."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    except ImportError:
        raise ConfigError("streaming a transformers checkpoint needs the transformers "
                          "package (pip install transformers)") from None
    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config.json "
                              f"({str(e).splitlines()[0]})") from None
    dtype = resolve_dtype(config, dtype)
    with _params_on_meta(), _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if hasattr(model, "tie_weights"):  # ties (lm_head = embed_tokens) as from_pretrained does
        model.tie_weights()
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError):
            pass
    return model.eval()


# --- loading and freeing parts ------------------------------------------------------------------
def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For every parameter object: each ``(module, attribute)`` that holds it (ties)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((m, k))
    return out


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint names to try for the model's parameter ``name`` (``prefix``: the base
    model's attribute, e.g. ``model``)."""
    out = [name]
    if prefix and name.startswith(prefix + "."):
        out.append(name[len(prefix) + 1:])
    elif prefix:
        out.append(f"{prefix}.{name}")
    return out


def _skipped(full: str, skip: str | None) -> bool:
    return bool(skip) and (full == skip or full.startswith(skip + "."))


def materialize(model: nn.Module, part: str, source: SafetensorsSource, dtype: torch.dtype,
                device: "str | torch.device" = "cpu", skip: str | None = None) -> int:
    """Load every parameter of ``model``'s submodule ``part`` (``""``: the whole model) that
    is on the meta device, and the stored buffers under it, from ``source``; floating
    tensors in ``dtype``, on ``device``; names under ``skip`` (e.g. the decoder blocks)
    excepted. Tied parameters are set in every module holding them. Returns the bytes
    loaded. A parameter missing from the checkpoint is a :class:`CheckpointError` (a tied
    one may be missing when its twin is stored)."""
    owners = _owners(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    root = model.get_submodule(part) if part else model
    all_names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        all_names.setdefault(id(p), []).append(n)
    loaded = 0
    for local, p in list(root.named_parameters()):
        full = f"{part}.{local}" if part else local
        if p.device.type != "meta" or _skipped(full, skip):
            continue
        key = None
        for n in [full, *[x for x in all_names.get(id(p), []) if x != full]]:
            key = next((c for c in _candidates(n, prefix) if c in source), None)
            if key is not None:
                break
        if key is None:
            raise CheckpointError(f"{source.path}: parameter {full!r} is missing from the "
                                  "checkpoint")
        t = source.read(key, dtype if p.is_floating_point() else None, device)
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{source.path}: tensor {key!r} has shape {list(t.shape)}, "
                                  f"the model's parameter {full!r} expects {list(p.shape)}")
        new = nn.Parameter(t, requires_grad=False)
        for m, k in owners.get(id(p), []):
            m._parameters[k] = new
        loaded += t.numel() * t.element_size()
    for local, b in list(root.named_buffers()):
        full = f"{part}.{local}" if part else local
        key = next((c for c in _candidates(full, prefix) if c in source), None)
        if key is None or "_quantizer." in full or _skipped(full, skip):
            continue
        mod_name, _, attr = local.rpartition(".")
        mod = root.get_submodule(mod_name) if mod_name else root
        t = source.read(key, dtype if b is not None and b.is_floating_point() else None, device)
        mod._buffers[attr] = t
        loaded += t.numel() * t.element_size()
    _invalidate(root)
    return loaded


def _invalidate(root: nn.Module) -> None:
    for m in root.modules():
        if hasattr(m, "invalidate_weight_cache"):
            m.invalidate_weight_cache()


def release(model: nn.Module, part: str, skip: str | None = None) -> None:
    """Send the parameters under ``model``'s submodule ``part`` (names under ``skip``
    excepted) back to the meta device (tied twins elsewhere too), and drop the cached and
    fixed tensors of its quantizers: the memory is freed once nothing else holds them."""
    from lowbit.nn.quantizer import TensorQuantizer

    owners = _owners(model)
    root = model.get_submodule(part) if part else model
    for local, p in list(root.named_parameters()):
        full = f"{part}.{local}" if part else local
        if p.device.type == "meta" or _skipped(full, skip):
            continue
        new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                           requires_grad=False)
        for m, k in owners.get(id(p), []):
            m._parameters[k] = new
    for n, m in root.named_modules():
        full = f"{part}.{n}" if part and n else (part or n)
        if isinstance(m, TensorQuantizer) and not _skipped(full, skip):
            for k in ("scale", "zero_point", "global_scale"):
                setattr(m, k, None)
            m.calibrator = None
    _invalidate(root)
