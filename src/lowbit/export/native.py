"""lowbit's own checkpoint: packed codes + scales + recipe, reloadable without the FP model.

Layout of the folder:

* ``lowbit_checkpoint.json``: format version, the recipe (as a YAML-ready dict), the specs
  of every quantized module (``modules``: weight/input/output specs as applied, group-size
  fallbacks included), for every quantized weight its 2-D shape and dtype (``quantized``),
  the KV-cache spec, quantizers switched off, tied parameters, the MoE experts modules
  split per expert (``moe_experts``: name -> experts class; :func:`load` splits the rebuilt
  model's experts the same way before loading, so ``mlp.experts.E.down_proj`` exist), the
  online rotations (``online_rotations``: module name -> ``{where, kind, size, seed,
  block}``, see :mod:`lowbit.nn.rotation`; their matrices are ordinary buffers
  ``<module>.<input_rotation|qk_rotation|output_rotation>.matrix`` of the state dict, and
  :func:`load` re-attaches them before loading it);
* ``model.safetensors`` (or shards ``model-00001-of-0000N.safetensors`` with
  ``model.safetensors.index.json``): for a quantized weight ``W`` of module ``m``:
  ``m.weight.codes`` (uint8, codes packed along the input dimension, see
  :mod:`lowbit.formats.packing`), ``m.weight.scale`` (stored layout, in the dtype of its scale
  format: float32/float16/bfloat16, e4m3/e8m0 as uint8 codes), ``m.weight.zero_point``
  (affine only: integer codes of the element format, packed along the last axis),
  ``m.weight.global_scale`` (NVFP4, float32 [1]); a ``gguf_*`` weight (ggml type) is
  ``m.weight.codes`` alone, ggml's bytes ``[out, in/block*block_bytes]`` holding every
  scale (as in a GGUF file, rows in lowbit's order); calibrated statistics of activation and
  KV-cache quantizers under their names (``...input_quantizer.amax``,
  ``...self_attn.k_cache_quantizer.amax``); every other parameter and buffer as it is, tied
  ones once;
* ``config.json``, ``generation_config.json`` (+ tokenizer files) for transformers models.

The metadata also names the saved model's class (``model_class``, ``model_module``), the
un-quantized class of every module with a quantized weight and the weight's own shape
(``quantized[name]["class"]``: ``Conv2d``, ``Linear`` ...; ``["weight_shape"]``), so that a
model given to :func:`load` is checked module by module.

:func:`load` rebuilds the model from ``config.json`` (no weight initialisation; the saved
transformers class, any head), or takes the un-quantized model the caller gives
(``model=``: any ``nn.Module``, or a function building one), inserts the
quantizers with the stored specs, and installs the dequantized weights with their fixed
scales: its outputs equal the exported model's bit for bit. Nothing but safetensors and JSON
is read (see :mod:`lowbit.export.safe_read`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowbit import formats
from lowbit.core import QTensor, QuantSpec, dequantize
from lowbit.errors import CheckpointError, ConfigError
from lowbit.export.base import quantized_modules, weight_qtensor
from lowbit.export.safe_read import SCALE_DTYPES
from lowbit.export.shards import plain_tensors, write_hf_files, write_shards
from lowbit.nn.rotation import online_rotations
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
    _refuse_packed(model)
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
        key = f"{name}.weight"  # the stored name, whatever the parameter is called
        skip.add(f"{name}.{weight_name(m)}")
        wt = weight_param(m)
        tensors[f"{key}.codes"] = qt.packed_codes().contiguous()
        if _ggml_type(qt.spec) is None:  # ggml types: the bytes hold every scale
            tensors[f"{key}.scale"] = _scale_tensor(qt)
            if qt.zero_point is not None:
                tensors[f"{key}.zero_point"] = _zero_point_codes(qt)
            if qt.global_scale is not None:
                tensors[f"{key}.global_scale"] = qt.global_scale.reshape(1).float()
        qmeta[name] = {"shape": list(qt.shape), "dtype": str(wt.dtype).split(".")[-1],
                       "spec": qt.spec.model_dump(exclude_defaults=True),
                       "fixed": m.weight_quantizer.scale is not None,
                       "weight_shape": list(wt.shape), "class": float_class(m).__name__}
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
            "model_module": type(model).__module__,
            "dtype": str(_model_dtype(model)).split(".")[-1],
            "recipe": recipe.to_dict() if recipe is not None else None,
            "modules": modules, "quantized": qmeta, "tied": tied,
            "kv_cache": {"spec": _spec_dict(kv_spec), "quantizers": kv_names},
            "disabled": disabled, "moe_experts": _split_experts(model),
            "online_rotations": online_rotations(model)}
    write_shards(tensors, out_dir, max_shard_size, {"format": "lowbit"})
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    write_hf_files(model, out_dir, tokenizer)


def _refuse_packed(model: nn.Module) -> None:
    """ConfigError naming the first layer packed by :func:`lowbit.runtime.convert`: a native
    checkpoint is written from the fake-quantized model (codes from its weights and
    quantizers), which a converted model no longer has."""
    from lowbit.runtime.conv import PackedConv2d
    from lowbit.runtime.packed import PackedLinear

    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, PackedConv2d)):
            raise ConfigError(f"module {name!r} is a {type(m).__name__} made by "
                              f"lowbit.runtime.convert: save the fake-quantized model before "
                              f"converting it, and load it with lowbit.load(path, "
                              f"packed=True) to get packed layers")


def _split_experts(model: nn.Module) -> dict[str, str]:
    """``{name: experts class}`` of the MoE experts modules split per expert
    (:class:`lowbit.nn.experts.MoEExperts`): :func:`load` splits them the same way."""
    from lowbit.nn.experts import MoEExperts

    return {n: m.source_class for n, m in model.named_modules() if isinstance(m, MoEExperts)}


def _split_like_checkpoint(model: nn.Module, meta: dict, where: str,
                           src: str = "the model built from config.json") -> None:
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
                                  f"are not in {src} (it has "
                                  f"{have.get(name, 'no such module')})")
    try:
        unfuse_experts(model)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _ggml_type(spec: QuantSpec) -> str | None:
    """``"Q4_K"`` for a ``gguf_q4_k`` spec, else None."""
    f = spec.format
    return f[5:].upper() if isinstance(f, str) and f.startswith("gguf_") else None


def _ggml_qtensor(spec: QuantSpec, kind: str, raw: torch.Tensor, shape: tuple, dtype,
                  key: str) -> QTensor:
    """The QTensor of a ``gguf_*`` weight stored as ggml's bytes ``raw`` (uint8 ``[O,
    nbytes]``): fields unpacked (:func:`lowbit.formats.ggml_blocks.unpack`), effective
    scales from :func:`lowbit.core.ggml.fields_effective`."""
    from lowbit.core.ggml import fields_effective
    from lowbit.errors import FormatError
    from lowbit.formats import ggml_blocks

    if len(shape) != 2 or raw.dtype != torch.uint8 or raw.ndim != 2 or raw.shape[0] != shape[0]:
        raise CheckpointError(f"{key}.codes: {list(raw.shape)} {raw.dtype}; expected uint8 "
                              f"[{shape[0] if shape else '?'}, bytes] of {kind} blocks")
    try:
        fields = ggml_blocks.unpack(kind, raw.numpy(), shape[1])
    except FormatError as e:
        raise CheckpointError(f"{key}.codes: {e}") from None
    s, zp, gs = fields_effective(kind, fields)
    return QTensor(fields["q"].reshape(shape), s, zp, spec, shape, dtype, gs, fields)


def qtensor_from(meta: dict, tensors: dict[str, torch.Tensor], key: str) -> QTensor:
    """Rebuild the QTensor of quantized weight ``key`` (``module.weight``) from a checkpoint
    (``gguf_*`` weights: from ggml's bytes in ``key.codes``)."""
    spec = QuantSpec.parse(meta["spec"], key)
    shape = tuple(meta["shape"])
    kind = _ggml_type(spec)
    if kind is not None:
        return _ggml_qtensor(spec, kind, tensors[f"{key}.codes"], shape,
                             getattr(torch, meta.get("dtype", "float32")), key)
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


def weight_name(m: nn.Module) -> str:
    """The name of the parameter a (quantized, or quantizable) module's weight quantizer
    quantizes: ``weight``, or ``in_proj_weight`` (``nn.MultiheadAttention``), as its
    quantized class declares (``weight_name``)."""
    from lowbit.nn import QuantMixin, quant_class_for

    cls = type(m) if isinstance(m, QuantMixin) else quant_class_for(m)
    return getattr(cls, "weight_name", "weight") if cls is not None else "weight"


def weight_param(m: nn.Module) -> torch.Tensor:
    """The quantized weight parameter of module ``m`` (see :func:`weight_name`)."""
    return getattr(m, weight_name(m))


def float_class(m: nn.Module) -> type:
    """The class a quantized module was made from (``QuantConv2d`` -> ``nn.Conv2d``): the
    first class of its MRO that is not one of lowbit's quantized classes."""
    from lowbit.nn.modules import QuantMixin

    for c in type(m).__mro__:
        if not issubclass(c, QuantMixin):
            return c
    return type(m)


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _spec(d: dict | None, where: str) -> QuantSpec | None:
    return None if d is None else QuantSpec.parse(d, where)


def _insert_quantizers(model: nn.Module, meta: dict, where: str, src: str) -> None:
    from lowbit.nn import attach_kv_quantizers, quantize_module

    try:
        _insert(model, meta, where, src, attach_kv_quantizers, quantize_module)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def check_modules(model: nn.Module, meta: dict, where: str, src: str) -> None:
    """Every quantized module of the checkpoint exists in ``model`` (described by ``src``)
    with its un-quantized class and weight shape; a CheckpointError names the first that
    does not. Nothing is changed, so a failed check leaves ``model`` as it was."""
    from lowbit.nn import quant_class_for

    mods = dict(model.named_modules())
    for name in meta.get("modules", {}):
        m = mods.get(name)
        want = (meta["quantized"].get(name) or {}).get("class")
        if m is None:
            raise CheckpointError(f"{where}: quantized module {name!r}"
                                  + (f" ({want})" if want else "") + f" does not exist in "
                                  f"{src}")
        if want is not None and type(m).__name__ != want:
            raise CheckpointError(f"{where}: module {name!r} is a {type(m).__name__} in "
                                  f"{src}; the checkpoint quantized a {want} there")
        if quant_class_for(m) is None:
            raise CheckpointError(f"{where}: module {name!r} of {src} is a "
                                  f"{type(m).__name__}, which lowbit cannot quantize")
        qm = meta["quantized"].get(name)
        w = getattr(m, quant_class_for(m).weight_name, None)
        if qm is None or not isinstance(w, torch.Tensor):
            continue
        shape = qm.get("weight_shape")
        if shape is not None and list(w.shape) != list(shape):
            raise CheckpointError(f"{where}: module {name!r} has a weight of shape "
                                  f"{list(w.shape)} in {src}; the checkpoint's is "
                                  f"{list(shape)}")
        if w.numel() != math.prod(qm["shape"]):
            raise CheckpointError(f"{where}: module {name!r} has a weight of "
                                  f"{w.numel()} values in {src}; the checkpoint's [out, in] "
                                  f"weight is {qm['shape']}")


_KV_ATTRS = ("k_cache_quantizer", "v_cache_quantizer", "k_cache_quantizer_fallback",
             "v_cache_quantizer_fallback")


def _insert(model, meta, where, src, attach_kv_quantizers, quantize_module) -> None:
    check_modules(model, meta, where, src)
    mods = dict(model.named_modules())
    for name, specs in meta.get("modules", {}).items():
        m = mods[name]
        quantize_module(m, _spec(specs.get("weight"), f"{where}: {name}.weight"),
                        _spec(specs.get("input"), f"{where}: {name}.input"),
                        _spec(specs.get("output"), f"{where}: {name}.output"), name)
        qm = meta["quantized"].get(name)
        if qm is not None and tuple(m.weight_2d().shape) != tuple(qm["shape"]):
            raise CheckpointError(f"{where}: module {name!r} has a [out, in] weight of shape "
                                  f"{list(m.weight_2d().shape)} in {src}; the checkpoint's "
                                  f"is {qm['shape']}")
    kv = meta.get("kv_cache") or {}
    if kv.get("spec") is not None:
        attached = attach_kv_quantizers(model, _spec(kv["spec"], f"{where}: kv_cache"))
        saved = kv.get("quantizers")
        if saved is not None:  # only the attention modules that had them when saved (the
            keep = set(saved)  # pipeline removes a vision encoder's, see pipeline.unreached)
            mods = dict(model.named_modules())
            for name, _ in attached:
                for attr in _KV_ATTRS:
                    if f"{name}.{attr}" not in keep:
                        q = mods[name]._modules.pop(attr, None)
                        if q is not None:
                            q.disable()  # a projection hook may still hold it


def attach_saved_rotations(model: nn.Module, meta: dict, where: str) -> None:
    """Re-create the checkpoint's online rotations (``meta["online_rotations"]``, see
    :func:`lowbit.nn.online_rotations`) on ``model`` as empty matrices of the saved shapes,
    so that loading the state dict fills them (nothing missing or unexpected). A rotation
    the model cannot hold is a CheckpointError naming the module."""
    from lowbit.nn.rotation import OnlineRotation, attach_rotation

    for key, spec in (meta.get("online_rotations") or {}).items():
        name = key.split("#")[0]
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: online_rotations[{key!r}] is not an object")
        try:
            rot = OnlineRotation.placeholder(spec, f"{where}: online_rotations[{key!r}]")
            attach_rotation(model, name, spec.get("where"), rot)
        except ConfigError as e:
            raise CheckpointError(f"{where}: online rotation of {name!r}: {e}") from None


def _pretrained_class(model) -> bool:
    """Whether ``model`` is a transformers model class (``PreTrainedModel`` subclass)."""
    tf = sys.modules.get("transformers")
    return isinstance(model, type) and tf is not None and issubclass(model, tf.PreTrainedModel)


def _transformers_model(path: Path, meta: dict, meta_file: str, cls: type | None = None
                        ) -> nn.Module:
    """The model of the checkpoint's transformers class (``meta["model_class"]``; a causal
    LM for checkpoints that name none), or of ``cls`` when given, built from
    ``config.json`` without initialisation."""
    hint = ("pass the un-quantized model to load into: lowbit.load(path, model=<instance, "
            "or a function returning one>)")
    cls_name = meta.get("model_class")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json, the checkpoint holds a "
                              f"{cls_name or 'model'} that is not a transformers model; "
                              f"{hint}")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config.json ({str(e).splitlines()[0]})") \
            from None
    dtype = getattr(torch, meta.get("dtype", "float32"))
    if cls is None and cls_name is not None:
        try:
            cls = getattr(transformers, cls_name)
        except Exception as e:  # noqa: BLE001 - unknown name, or its module fails to import
            raise CheckpointError(f"{meta_file}: model class {cls_name!r} is not a class of "
                                  f"the installed transformers ({str(e).splitlines()[0]}); "
                                  f"{hint}") from None
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise CheckpointError(f"{meta_file}: model class {cls_name!r} is not a "
                                  f"transformers model class; {hint}")
    with _no_init():
        model = cls._from_config(config, dtype=dtype) if cls is not None else \
            AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _given_model(model, meta: dict) -> nn.Module:
    """The user's un-quantized model to load into: ``model`` itself, or what calling it
    returns; a ConfigError when it is neither, or is already quantized by lowbit."""
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ConfigError(f"model: expected an un-quantized nn.Module or a function "
                              f"returning one; got a {type(model).__name__}")
        built = model()
        if not isinstance(built, nn.Module):
            raise ConfigError(f"model: {getattr(model, '__name__', model)!r} returned a "
                              f"{type(built).__name__}; expected an nn.Module")
        model = built
    for name, m in model.named_modules():
        if type(m).__module__.split(".")[0] == "lowbit":
            raise ConfigError(f"model: module {name or '<root>'!r} is a {type(m).__name__} "
                              f"of lowbit: the model is already quantized or converted; pass "
                              f"the un-quantized {meta.get('model_class') or 'model'}")
    if getattr(model, "lowbit_recipe", None) is not None:
        raise ConfigError("model: already quantized (it has a lowbit_recipe); pass the "
                          "un-quantized model")
    return model


def _match_dtypes(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Cast the given model's floating parameters and buffers to the checkpoint's dtypes
    (quantized weights: their recorded dtype), so the loaded model computes as the saved
    one did."""
    mods = dict(model.named_modules())
    want = {f"{n}.{weight_name(mods[n])}": getattr(torch, q.get("dtype", "float32"))
            for n, q in meta["quantized"].items()}
    want.update({k: t.dtype for k, t in tensors.items() if t.is_floating_point()})
    for mod_name, mod in model.named_modules():
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None:
                continue
            key = f"{mod_name}.{attr}" if mod_name else attr
            dt = want.get(key)
            if dt is not None and t.is_floating_point() and t.dtype != dt:
                t.data = t.data.to(dt)


def load(path: "str | Path", device: str = "cpu", packed: "bool | dict" = False,
         model: "nn.Module | Callable[[], nn.Module] | None" = None) -> nn.Module:
    """Rebuild a quantized model from a native lowbit checkpoint folder.

    ``model=None``: a transformers model of the class that was saved (any head: causal LM,
    sequence classification, ``Gemma3ForConditionalGeneration`` ...; checkpoints of older
    versions: a causal LM), built from ``config.json`` without weight initialisation.
    ``model=`` an un-quantized ``nn.Module`` (a CNN, a ViT, a transformers model ...), or a
    function (a class, a constructor) returning one (a transformers model class is built
    from ``config.json``, like ``model=None``): the checkpoint is loaded into it, in
    place, and it is returned (cast to the checkpoint's dtypes, in eval mode). A model that
    is already quantized is a ConfigError. Modules, classes and shapes are checked before the
    given model is changed; an error found later (a tensor missing from the file) may leave
    it partly loaded (pass a function to get a fresh one each time). The FP checkpoint is
    never needed.

    Quantizers are inserted with the stored specs (no calibration), quantized weights are
    installed as ``dequantize(codes, scales)`` with those scales fixed, calibrated
    statistics and every other tensor are loaded as stored: the outputs equal the saved
    model's bit for bit. A module of the checkpoint missing from the model, of another
    class, or with a weight of another shape, a tensor missing or left over, a missing,
    truncated or inconsistent file: :class:`~lowbit.errors.CheckpointError` naming it.

    ``packed=True`` (or a dict of :func:`lowbit.runtime.convert` options: ``fast``,
    ``act_dtype``) gives the model :func:`lowbit.runtime.convert` would make of it, built
    from the stored codes directly: quantized linear layers (and int8 Conv2d) never get
    float weights (see :mod:`lowbit.runtime.loading`); ``device`` also picks their kernels.
    """
    from lowbit.config import Recipe
    from lowbit.export.safe_read import check_against_model, read_checkpoint

    path = Path(path)
    meta, tensors, where = read_checkpoint(path)
    meta_file = str(path / META)
    given = model is not None
    if not given:
        model = _transformers_model(path, meta, meta_file)
        src = "the model built from config.json"
    else:
        if _pretrained_class(model):  # a transformers class: built from config.json
            model = _transformers_model(path, meta, meta_file, model)
        model = _given_model(model, meta)
        src = f"the given model ({type(model).__name__})"
        if not meta.get("moe_experts"):  # else checked once the experts are split
            check_modules(model, meta, meta_file, src)
    model.eval()
    recipe = Recipe.parse(meta["recipe"], f"{meta_file}: recipe") if meta["recipe"] else None
    _split_like_checkpoint(model, meta, meta_file, src)
    if given:
        if meta.get("moe_experts"):
            check_modules(model, meta, meta_file, src)
        _match_dtypes(model, meta, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _insert_quantizers(model, meta, meta_file, src)
    attach_saved_rotations(model, meta, meta_file)
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
            w = m.weight_from_2d(dequantize(qt, torch.float32)).to(qt.dtype).contiguous()
            # a quantized weight tied to another parameter gets its own
            setattr(m, weight_name(m), nn.Parameter(
                w, requires_grad=weight_param(m).requires_grad))
            m.weight_quantizer.set_fixed_scale(qt.scale, qt.zero_point, qt.global_scale)
            m.invalidate_weight_cache()
        rest = {k: v for k, v in tensors.items() if k not in qkeys and "_quantizer." not in k}
        check_against_model(rest, where, model.state_dict())
        missing, unexpected = model.load_state_dict(rest, strict=False)
        allowed = set(meta["tied"]) | {f"{n}.{weight_name(mods[n])}"
                                       for n in meta["quantized"] if n in mods}
        bad = [k for k in missing if k not in allowed and "_quantizer." not in k and
               not (packed_names and allowed_missing(k, packed_names))]
        if bad:
            raise CheckpointError(f"{path}: tensor {bad[0]!r} is missing from the checkpoint "
                                  f"({len(bad)} missing in all; {src} has them)")
        if unexpected:
            raise CheckpointError(f"{path}: tensor {unexpected[0]!r} of the checkpoint is not "
                                  f"in {src} ({len(unexpected)} in all)")
        for k, src_key in meta["tied"].items():
            mod_name, _, attr = k.rpartition(".")
            owner = mods.get(mod_name)
            if owner is not None and mod_name not in meta["quantized"]:
                s_mod, _, s_attr = src_key.rpartition(".")
                setattr(owner, attr, getattr(mods[s_mod], s_attr))
    model.lowbit_recipe = recipe
    model = model.to(device)
    if packed:
        from lowbit.runtime import release_memory

        del tensors
        release_memory()
    return model
