"""lowbit's own checkpoint: packed codes + scales + recipe, reloadable without the FP model.

Layout of the folder:

* ``lowbit_checkpoint.json``: format version, the recipe (as a YAML-ready dict), the specs
  of every quantized module (``modules``: weight/input/output specs as applied, group-size
  fallbacks included), for every quantized weight its 2-D shape and dtype (``quantized``),
  the KV-cache spec, quantizers switched off, tied parameters, the MoE experts modules
  split per expert (``moe_experts``: name -> experts class; :func:`load` splits the rebuilt
  model's experts the same way before loading, so ``mlp.experts.E.down_proj`` exist);
* ``model.safetensors`` (or shards ``model-00001-of-0000N.safetensors`` with
  ``model.safetensors.index.json``): for a quantized weight ``W`` of module ``m``:
  ``m.weight.codes`` (uint8, codes packed along the input dimension, see
  :mod:`lowbit.formats.packing`), ``m.weight.scale`` (stored layout, in the dtype of its scale
  format: float32/float16/bfloat16, e4m3/e8m0 as uint8 codes), ``m.weight.zero_point``
  (affine only: integer codes of the element format, packed along the last axis),
  ``m.weight.global_scale`` (NVFP4, float32 [1]); calibrated statistics of activation and
  KV-cache quantizers under their names (``...input_quantizer.amax``,
  ``...self_attn.k_cache_quantizer.amax``); every other parameter and buffer as it is, tied
  ones once;
* ``config.json``, ``generation_config.json`` (+ tokenizer files) for transformers models.

:func:`load` rebuilds the model from ``config.json`` (no weight initialisation), inserts the
quantizers with the stored specs, and installs the dequantized weights with their fixed
scales: its outputs equal the exported model's bit for bit. Nothing but safetensors and JSON
is read (see :mod:`lowbit.export.safe_read`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from lowbit import formats
from lowbit.core import QTensor, QuantSpec, dequantize
from lowbit.errors import CheckpointError, ConfigError
from lowbit.export.base import quantized_modules, weight_qtensor
from lowbit.export.safe_read import SCALE_DTYPES
from lowbit.export.shards import plain_tensors, write_hf_files, write_shards
from lowbit.nn.utils import quantizers
from lowbit.options import accepted_options, reject_unknown

VERSION = 1
META = "lowbit_checkpoint.json"
WEIGHT_SUFFIXES = (".codes", ".scale", ".zero_point", ".global_scale")


def _scale_tensor(qt: QTensor) -> torch.Tensor:
    codes = qt.scale_codes()
    if codes is not None:
        return codes.contiguous()
    return qt.scale.to(SCALE_DTYPES[qt.spec.scale_format]).contiguous()  # exact: rounded so


def _zero_point_codes(qt: QTensor) -> torch.Tensor:
    """Integer zero-points as codes of the element format, packed along the last axis."""
    fmt = qt.element_format
    zp = qt.zero_point.reshape(-1, qt.zero_point.shape[-1]) if qt.zero_point.ndim else \
        qt.zero_point.reshape(1, 1)
    return formats.pack(fmt.encode(zp.float()), fmt.bits).contiguous()


def _spec_dict(spec: QuantSpec | None) -> dict | None:
    return None if spec is None else spec.model_dump(exclude_defaults=True)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def export(model: nn.Module, out_dir: Path, tokenizer=None, max_shard_size: int | None = None,
           **unknown) -> None:
    """Write ``model`` (quantized by lowbit) as a native lowbit checkpoint into ``out_dir``.

    Options: ``tokenizer`` (saved alongside), ``max_shard_size`` (bytes per safetensors
    shard; default one file). Any other option is a ConfigError naming it.
    """
    reject_unknown(unknown, "export format 'lowbit'",
                   accepted_options(export, ("model", "out_dir")))
    recipe = getattr(model, "lowbit_recipe", None)
    tensors: dict[str, torch.Tensor] = {}
    qmeta: dict[str, dict] = {}
    modules: dict[str, dict] = {}
    skip: set[str] = set()
    for name, m in quantized_modules(model):
        modules[name] = {r: _spec_dict(q.spec) for r, q in m.quantizers()}
        qt = weight_qtensor(m)
        if qt is None:
            continue
        key = f"{name}.weight"
        skip.add(key)
        tensors[f"{key}.codes"] = qt.packed_codes().contiguous()
        tensors[f"{key}.scale"] = _scale_tensor(qt)
        if qt.zero_point is not None:
            tensors[f"{key}.zero_point"] = _zero_point_codes(qt)
        if qt.global_scale is not None:
            tensors[f"{key}.global_scale"] = qt.global_scale.reshape(1).float()
        qmeta[name] = {"shape": list(qt.shape), "dtype": str(m.weight.dtype).split(".")[-1],
                       "spec": qt.spec.model_dump(exclude_defaults=True),
                       "fixed": m.weight_quantizer.scale is not None}
    kv_spec = None
    kv_names = []
    disabled = []
    for name, q in quantizers(model):
        if q.spec is not None and q.mode == "disabled":
            disabled.append(name)
        if q.role == "kv_cache":
            kv_names.append(name)
            kv_spec = kv_spec or q.spec
            if name.endswith("_fallback"):
                raise ConfigError(f"{name}: KV-cache quantizers on projection outputs (no "
                                  "shared attention function) cannot be exported")
        if q.role != "weight" and q.amax is not None:
            tensors[f"{name}.amax"] = q.amax.float().contiguous()
            if q.amin is not None:
                tensors[f"{name}.amin"] = q.amin.float().contiguous()
    if recipe is not None and recipe.kv_cache is not None:
        kv_spec = recipe.kv_cache
    plain, tied = plain_tensors(model, skip)
    tensors.update(plain)
    meta = {"format": "lowbit", "version": VERSION,
            "model_class": type(model).__name__,
            "dtype": str(_model_dtype(model)).split(".")[-1],
            "recipe": recipe.to_dict() if recipe is not None else None,
            "modules": modules, "quantized": qmeta, "tied": tied,
            "kv_cache": {"spec": _spec_dict(kv_spec), "quantizers": kv_names},
            "disabled": disabled, "moe_experts": _split_experts(model)}
    write_shards(tensors, out_dir, max_shard_size, {"format": "lowbit"})
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    write_hf_files(model, out_dir, tokenizer)


def _split_experts(model: nn.Module) -> dict[str, str]:
    """``{name: experts class}`` of the MoE experts modules split per expert
    (:class:`lowbit.nn.experts.MoEExperts`): :func:`load` splits them the same way."""
    from lowbit.nn.experts import MoEExperts

    return {n: m.source_class for n, m in model.named_modules() if isinstance(m, MoEExperts)}


def _split_like_checkpoint(model: nn.Module, meta: dict, where: str) -> None:
    """Split the freshly built model's stacked MoE experts as the exported model's were
    (``meta["moe_experts"]``), so that the per-expert tensor names exist; a mismatch (a
    checkpoint's experts module the model does not have, or of another class) is a
    CheckpointError."""
    from lowbit.adapters.experts import fused_experts, unfuse_experts

    want = meta.get("moe_experts") or {}
    if not want:
        return
    have = {n: type(m).__name__ for n, m in fused_experts(model).items()}
    for name, cls in want.items():
        if have.get(name) != cls:
            raise CheckpointError(f"{where}: MoE experts {name!r} ({cls}) of the checkpoint "
                                  f"are not in the model built from config.json (it has "
                                  f"{have.get(name, 'no such module')})")
    try:
        unfuse_experts(model)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def qtensor_from(meta: dict, tensors: dict[str, torch.Tensor], key: str) -> QTensor:
    """Rebuild the QTensor of quantized weight ``key`` (``module.weight``) from a checkpoint."""
    spec = QuantSpec.parse(meta["spec"], key)
    shape = tuple(meta["shape"])
    fmt = spec.element_format
    codes = formats.unpack(tensors[f"{key}.codes"], fmt.bits, shape[-1])
    scale = tensors[f"{key}.scale"]
    if spec.scale_format in ("e4m3", "e8m0"):
        scale = formats.get(spec.scale_format).decode(scale)
    zp = tensors.get(f"{key}.zero_point")
    if zp is not None:
        zshape = tuple(scale.shape)
        n = zshape[-1] if zshape else 1
        zp = fmt.code_to_int(formats.unpack(zp, fmt.bits, n)).reshape(zshape)
    gs = tensors.get(f"{key}.global_scale")
    return QTensor(codes, scale.float(), zp, spec, shape,
                   getattr(torch, meta.get("dtype", "float32")),
                   None if gs is None else gs.reshape(()))


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _spec(d: dict | None, where: str) -> QuantSpec | None:
    return None if d is None else QuantSpec.parse(d, where)


def _insert_quantizers(model: nn.Module, meta: dict, where: str) -> None:
    from lowbit.nn import attach_kv_quantizers, quantize_module

    try:
        _insert(model, meta, where, attach_kv_quantizers, quantize_module)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _insert(model, meta, where, attach_kv_quantizers, quantize_module) -> None:
    mods = dict(model.named_modules())
    for name, specs in meta.get("modules", {}).items():
        m = mods.get(name)
        if m is None:
            raise CheckpointError(f"{where}: quantized module {name!r} does not exist in the "
                                  f"model built from config.json")
        quantize_module(m, _spec(specs.get("weight"), f"{where}: {name}.weight"),
                        _spec(specs.get("input"), f"{where}: {name}.input"),
                        _spec(specs.get("output"), f"{where}: {name}.output"), name)
    kv = meta.get("kv_cache") or {}
    if kv.get("spec") is not None:
        attach_kv_quantizers(model, _spec(kv["spec"], f"{where}: kv_cache"))


def load(path: "str | Path", device: str = "cpu", packed: "bool | dict" = False
         ) -> nn.Module:
    """Rebuild a quantized transformers model from a native lowbit checkpoint folder.

    The FP checkpoint is not needed: the model is built from ``config.json`` without weight
    initialisation, quantizers are inserted with the stored specs (no calibration), quantized
    weights are installed as ``dequantize(codes, scales)`` with those scales fixed, calibrated
    statistics and every other tensor are loaded as stored. Raises
    :class:`~lowbit.errors.CheckpointError` for a missing, truncated or inconsistent file.

    ``packed=True`` (or a dict of :func:`lowbit.runtime.convert` options: ``fast``,
    ``act_dtype``) gives the model :func:`lowbit.runtime.convert` would make of it, built
    from the stored codes directly: quantized linear layers never get float weights (see
    :mod:`lowbit.runtime.loading`); ``device`` also picks their kernels.
    """
    from lowbit.config import Recipe
    from lowbit.export.safe_read import check_against_model, read_checkpoint

    path = Path(path)
    meta, tensors, where = read_checkpoint(path)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config.json ({str(e).splitlines()[0]})") \
            from None
    dtype = getattr(torch, meta.get("dtype", "float32"))
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    meta_file = str(path / META)
    recipe = Recipe.parse(meta["recipe"], f"{meta_file}: recipe") if meta["recipe"] else None
    _split_like_checkpoint(model, meta, meta_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _insert_quantizers(model, meta, meta_file)
    qkeys = {f"{n}.weight{s}" for n in meta["quantized"] for s in WEIGHT_SUFFIXES}
    with torch.no_grad():
        # statistics first: packed kernels fuse static activation scales at build time
        for name, q in quantizers(model):
            a = tensors.get(f"{name}.amax")
            if a is not None:
                q.set_amax(a, tensors.get(f"{name}.amin"))
            if name in meta.get("disabled", ()):
                q.disable()
            elif q.needs_calibration and q.amax is None:
                raise CheckpointError(f"{path}: tensor {name + '.amax'!r} is missing (the "
                                      f"calibrated range of a static quantizer)")
        packed_names: set[str] = set()
        if packed:
            from lowbit.runtime.loading import allowed_missing, install_packed

            packed_names = install_packed(model, meta["quantized"], tensors, device,
                                          packed if isinstance(packed, dict) else None)
        mods = dict(model.named_modules())
        for name, qm in meta["quantized"].items():
            if name in packed_names:
                continue
            key = f"{name}.weight"
            qt = qtensor_from(qm, tensors, key)
            m = mods[name]
            w = m.weight_from_2d(dequantize(qt, torch.float32)).to(m.weight.dtype).contiguous()
            # a quantized weight tied to another parameter gets its own
            m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
            m.weight_quantizer.set_fixed_scale(qt.scale, qt.zero_point, qt.global_scale)
            m.invalidate_weight_cache()
        rest = {k: v for k, v in tensors.items() if k not in qkeys and "_quantizer." not in k}
        check_against_model(rest, where, model.state_dict())
        missing, unexpected = model.load_state_dict(rest, strict=False)
        allowed = set(meta["tied"]) | {f"{n}.weight" for n in meta["quantized"]}
        bad = [k for k in missing if k not in allowed and "_quantizer." not in k and
               not (packed_names and allowed_missing(k, packed_names))]
        if bad:
            raise CheckpointError(f"{path}: tensor {bad[0]!r} is missing from the checkpoint "
                                  f"({len(bad)} missing in all)")
        if unexpected:
            raise CheckpointError(f"{path}: tensor {unexpected[0]!r} of the checkpoint is not "
                                  f"in the model built from config.json")
        for k, src in meta["tied"].items():
            mod_name, _, attr = k.rpartition(".")
            owner = mods.get(mod_name)
            if owner is not None and mod_name not in meta["quantized"]:
                s_mod, _, s_attr = src.rpartition(".")
                setattr(owner, attr, getattr(mods[s_mod], s_attr))
    model.lowbit_recipe = recipe
    model = model.to(device)
    if packed:
        from lowbit.runtime import release_memory

        del tensors
        release_memory()
    return model
