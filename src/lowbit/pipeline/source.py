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

MoE experts (split per expert by :func:`lowbit.adapters.experts.unfuse_experts`, names
``mlp.experts.E.gate_proj.weight``) are read from whichever layout the checkpoint has:

1. per expert under the same names (Qwen-MoE, OLMoE, DeepSeek, GLM-4-MoE hub checkpoints,
   and what transformers 5's ``save_pretrained`` writes for them);
2. Mixtral's names: ``block_sparse_moe.experts.E.w1`` (gate) / ``w3`` (up) / ``w2`` (down),
   router ``block_sparse_moe.gate`` (Mixtral and PhiMoE checkpoints);
3. stacked over experts as the family's ``*Experts`` module holds them
   (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj``, transposed/interleaved/biased
   per its :class:`~lowbit.nn.experts.ExpertsLayout`: gpt-oss, a ``state_dict`` saved as
   it is): only expert E's slab ``[E]`` is read from the file, so a block's experts never
   sit in memory twice.

Anything else (e.g. gpt-oss's original MXFP4 ``mlp1_weight.blocks``) is a CheckpointError
naming the parameter and the names looked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
        t = self._read(f, off, nbytes, name).view(stored).reshape(shape)
        return self._cast(t, dtype, device)

    def read_index(self, name: str, index: int, dtype: torch.dtype | None = None,
                   device: "str | torch.device" = "cpu") -> torch.Tensor:
        """``tensor[index]`` of the stored tensor ``name`` (``shape[1:]``), reading only
        that slab of the file (one expert of a stacked ``[E, ...]`` tensor)."""
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        f, off, nbytes, stored, shape = self.entries[name]
        if not shape or not 0 <= index < shape[0]:
            raise CheckpointError(f"{self.path}: tensor {name!r} {list(shape)} has no "
                                  f"index {index} along its first dimension")
        slab = nbytes // shape[0]
        t = self._read(f, off + index * slab, slab, name).view(stored).reshape(shape[1:])
        return self._cast(t, dtype, device)

    @staticmethod
    def _cast(t: torch.Tensor, dtype, device) -> torch.Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device) if torch.device(device).type != "cpu" else t

    @staticmethod
    def _read(f: Path, off: int, nbytes: int, name: str) -> torch.Tensor:
        """``nbytes`` bytes of file ``f`` from ``off`` into a fresh uint8 buffer."""
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
        return buf

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


# Mixtral/PhiMoE checkpoint names of the parts transformers 5 calls mlp.experts.E.* / mlp.gate
_MIXTRAL_ROLES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")


def _aliases(name: str) -> list[str]:
    """Other checkpoint names of model parameter ``name`` (Mixtral's ``block_sparse_moe``
    naming of the router and the experts), tried when ``name`` itself is not stored."""
    if ".mlp." not in name:
        return []
    alt = _EXPERT_RE.sub(lambda m: f".block_sparse_moe.experts.{m.group(1)}."
                         f"{_MIXTRAL_ROLES[m.group(2)]}.", name)
    if alt == name:
        alt = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    return [alt] if alt != name else []


def _expert_params(root: nn.Module, part: str) -> dict[str, tuple]:
    """``{full parameter name: (experts module name, layout, expert, role, attr)}`` for the
    split MoE experts under ``root``."""
    from lowbit.nn.experts import ROLES, MoEExperts

    out: dict[str, tuple] = {}
    for n, m in root.named_modules():
        if not isinstance(m, MoEExperts):
            continue
        full = f"{part}.{n}" if part and n else (part or n)
        for e, ex in enumerate(m):
            for role in ROLES:
                lin = getattr(ex, role, None)
                for attr in ("weight", "bias"):
                    if lin is not None and getattr(lin, attr, None) is not None:
                        out[f"{full}.{e}.{role}.{attr}"] = (full, m.layout, e, role, attr)
    return out


class _FusedReader:
    """Reads one expert's weight or bias out of stacked ``[E, ...]`` tensors (layout 3 of
    the module doc), keeping the last slab so gate and up share one read."""

    def __init__(self, source: "SafetensorsSource", prefix: str):
        self.source, self.prefix, self._last = source, prefix, (None, None)

    def key(self, info: tuple) -> str | None:
        """The stored name of the stacked tensor holding ``info``'s expert, or None."""
        full, lay, _, role, attr = info
        base = lay.down if role == "down_proj" else (lay.gate_up or lay.up)
        name = f"{full}.{base}" + ("_bias" if attr == "bias" else "")
        return next((c for c in _candidates(name, self.prefix) if c in self.source), None)

    def read(self, key: str, info: tuple, dtype, device) -> torch.Tensor:
        """Expert ``info[2]``'s ``[out, in]`` weight (or ``[out]`` bias) from ``key``."""
        from lowbit.nn.experts import split_gate_up

        _, lay, e, role, attr = info
        if self._last[0] != (key, e):
            self._last = ((key, e), self.source.read_index(key, e, dtype, device))
        t = self._last[1]
        if attr == "weight" and lay.transposed:
            t = t.t()
        if role != "down_proj" and lay.has_gate:
            g, u = split_gate_up(t, lay.concatenated)
            t = g if role == "gate_proj" else u
        return t.contiguous()


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
    experts = _expert_params(root, part)
    fused = _FusedReader(source, prefix)
    for local, p in list(root.named_parameters()):
        full = f"{part}.{local}" if part else local
        if p.device.type != "meta" or _skipped(full, skip):
            continue
        key = None
        for n in [full, *[x for x in all_names.get(id(p), []) if x != full]]:
            cands = _candidates(n, prefix)
            key = next((c for c in cands + [a for c in cands for a in _aliases(c)]
                        if c in source), None)
            if key is not None:
                break
        info = experts.get(full) if key is None else None
        fkey = fused.key(info) if info is not None else None
        if key is None and fkey is None:
            tried = [full, *_aliases(full)]
            if info is not None:
                lay = info[1]
                base = lay.down if info[3] == "down_proj" else (lay.gate_up or lay.up)
                tried.append(f"{info[0]}.{base} (stacked [E, ...])")
            raise CheckpointError(f"{source.path}: parameter {full!r} is missing from the "
                                  f"checkpoint (looked for {', '.join(map(repr, tried))})")
        if key is not None:
            t = source.read(key, dtype if p.is_floating_point() else None, device)
        else:
            key = f"{fkey}[{info[2]}]"
            t = fused.read(fkey, info, dtype if p.is_floating_point() else None, device)
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
