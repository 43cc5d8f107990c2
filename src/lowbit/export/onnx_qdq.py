"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ): what onnxruntime and TensorRT load.

>>> lowbit.save(model, "out/", format="onnx", example_inputs=(x,))   # out/model.onnx  # doctest: +SKIP

The model is traced with ``torch.onnx.export(dynamo=True)`` while every quantized module
computes through three small custom ops that translate to standard ONNX:

* weights: the codes as an initializer of their ONNX type (INT8/UINT8, INT4/UINT4 for
  2..4-bit codes, FLOAT8E4M3FN/FLOAT8E5M2, FLOAT4E2M1) and ``DequantizeLinear`` with the
  float32 scales (+ zero-points): per-tensor, per-channel (``axis``), groups and 2-D blocks
  as blocked DQ (``axis`` + ``block_size``, opset 21; blocks spanning whole rows, as
  ``nn.MultiheadAttention``'s per q/k/v part scales, as per-channel DQ with repeated
  scales); the DQ output is reshaped to the module's weight (convolutions, the packed
  ``in_proj_weight``) and feeds the original MatMul/Gemm/Conv;
* static activations (input and output quantizers with calibrated scales):
  ``QuantizeLinear -> DequantizeLinear`` with the calibrated scale and zero-point, in
  float32 (a float16 model gets Casts around them);
* dynamic activations have no QDQ form, except lowbit's ``uint8`` affine per-tensor
  dynamic spec, which is exactly ``DynamicQuantizeLinear -> DequantizeLinear``; any other
  dynamic spec is a ConfigError naming the layer.

Numerics equal lowbit's fake quantization: the same codes and scales, ``round half to
even`` and saturation in QuantizeLinear, ``(q - zero_point) * scale`` in DequantizeLinear.
The opset defaults to the smallest that holds every tensor (18; 19 for FP8; 21 for INT4 or
blocked scales; 23 for FP4). onnxruntime (1.32, CPU) notes:

* FP8 QDQ runs only with graph optimization at ``ORT_ENABLE_BASIC`` or lower;
* FLOAT4 DequantizeLinear (NVFP4/MXFP4 weights) is not implemented: the file is valid ONNX
  that onnxruntime's CPU provider cannot run yet;
* at ``ORT_ENABLE_EXTENDED`` and above, an opset-21 graph where a static Q/DQ pair precedes a
  Reshape (GPT-2's ``Conv1D``) fails to load ("output_dtype INT8 does not match
  y_zero_point type UINT8"): pass ``disabled_optimizers=["QDQPropagationTransformer"]`` to
  ``InferenceSession``.

Online rotations (:mod:`lowbit.nn.rotation`: a quantized linear's ``input_rotation`` before
its input Q/DQ, an attention's ``qk_rotation`` on queries and keys, a norm's
``output_rotation``) are explicit ``MatMul`` nodes named ``<owner>.<attr>`` by the float32
initializer ``<owner>.<attr>.matrix`` (``[b, b]``, on a ``[..., n/b, b]`` view for a
block-diagonal rotation); offline rotations are in the weights.

The export traces the model (``torch.export``, fake tensors: no real forward pass). A model
whose forward needs keyword inputs gets them from ``example_kwargs`` (transformers LMs:
``{"use_cache": False}``).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from lowbit import formats
from lowbit.core import QuantSpec
from lowbit.core.layout import Layout
from lowbit.core.quant import compute_scales
from lowbit.errors import ConfigError
from lowbit.export.base import quantized_modules, weight_qtensor
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.nn.utils import quantizers
from lowbit.options import accepted_options, reject_unknown

FILENAME = "model.onnx"
_MIN_OPSET = 18  # the dynamo exporter's own minimum


# --- ONNX element types ------------------------------------------------------------------
@dataclass(frozen=True)
class _Elem:
    onnx_type: str  # onnx.TensorProto member name
    storage: torch.dtype  # what the exporter sees (retyped afterwards when they differ)
    opset: int
    exact_range: bool  # QuantizeLinear saturates to lowbit's code range

    @property
    def packed(self) -> bool:
        """Stored as int8/uint8 by the exporter, packed to 4 bits afterwards."""
        return self.onnx_type in ("INT4", "UINT4", "FLOAT4E2M1")


def _elem(fmt: formats.Format, where: str) -> _Elem:
    """The ONNX type that holds the codes of ``fmt``."""
    if fmt.kind == "int":
        signed = fmt.qmin < 0
        if fmt.bits <= 4:
            return _Elem("INT4" if signed else "UINT4", torch.int8 if signed else torch.uint8,
                         21, fmt.bits == 4 and not getattr(fmt, "narrow", False))
        return _Elem("INT8" if signed else "UINT8", torch.int8 if signed else torch.uint8,
                     13, fmt.bits == 8 and not getattr(fmt, "narrow", False))
    table = {"fp8_e4m3": _Elem("FLOAT8E4M3FN", torch.float8_e4m3fn, 19, True),
             "fp8_e5m2": _Elem("FLOAT8E5M2", torch.float8_e5m2, 19, True),
             "fp4_e2m1": _Elem("FLOAT4E2M1", torch.uint8, 23, True)}
    if fmt.name not in table:
        raise ConfigError(f"ONNX export: {where}: ONNX has no type for {fmt.name} codes "
                          "(INT8/UINT8, INT4/UINT4, FLOAT8E4M3FN, FLOAT8E5M2, FLOAT4E2M1 exist)")
    return table[fmt.name]


def _codes_storage(codes: torch.Tensor, fmt: formats.Format, el: _Elem) -> torch.Tensor:
    """lowbit's uint8 code patterns as the storage tensor the exporter writes."""
    if fmt.kind == "int":
        return fmt.code_to_int(codes).to(el.storage)
    if el.storage == torch.uint8:
        return codes.clone()
    return codes.view(el.storage).clone()


def _decode_storage(t: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Values of a storage tensor (inverse of :func:`_codes_storage`), float32."""
    if t.dtype == torch.uint8 and fmt_name == "fp4_e2m1":
        return formats.get(fmt_name).decode(t)
    return t.float()


# --- custom ops (eager versions compute exactly what the ONNX ops do) ---------------------
def _broadcast(scale: torch.Tensor, shape, axis: int, block_size: int) -> torch.Tensor:
    if scale.ndim == 0:
        return scale
    if block_size > 0:
        s = scale.repeat_interleave(block_size, dim=axis)
        return s.narrow(axis, 0, shape[axis])
    view = [1] * len(shape)
    view[axis] = -1
    return scale.reshape(view)


@torch.library.custom_op("lowbit_onnx::dequantize", mutates_args=())
def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                axis: int, block_size: int, fmt: str) -> torch.Tensor:
    v = _decode_storage(codes, fmt)
    if zero_point is not None:
        v = v - _broadcast(_decode_storage(zero_point, fmt), v.shape, axis, block_size)
    return v * _broadcast(scale, v.shape, axis, block_size)


@_dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size, fmt):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("lowbit_onnx::qdq", mutates_args=())
def _qdq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
         fmt: str) -> torch.Tensor:
    f = formats.get(fmt)
    s = _broadcast(scale, x.shape, axis, 0)
    zp = _broadcast(_decode_storage(zero_point, fmt), x.shape, axis, 0)
    return (f.round(x / s + zp) - zp) * s


@_qdq.register_fake
def _(x, scale, zero_point, axis, fmt):
    return torch.empty_like(x)


@torch.library.custom_op("lowbit_onnx::dynamic_qdq", mutates_args=())
def _dynamic_qdq(x: torch.Tensor) -> torch.Tensor:
    from lowbit.core import fake_quant

    return fake_quant(x, _DYNAMIC_UINT8)


@_dynamic_qdq.register_fake
def _(x):
    return torch.empty_like(x)


_DYNAMIC_UINT8 = QuantSpec(format="uint8", granularity="tensor", symmetric=False, dynamic=True)


def _translations(opset: int) -> dict:
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}", None)
    if op is None:
        raise ConfigError(f"ONNX export: onnxscript {onnxscript.__version__} has no opset "
                          f"{opset}; choose an older opset")

    def dq(codes, scale, zero_point, axis: int, block_size: int, fmt: str):
        kw = {"axis": axis}
        if block_size > 0:
            kw["block_size"] = block_size
        if zero_point is None:
            return op.DequantizeLinear(codes, scale, **kw)
        return op.DequantizeLinear(codes, scale, zero_point, **kw)

    def qdq(x, scale, zero_point, axis: int, fmt: str):
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def dynamic_qdq(x):
        q, s, zp = op.DynamicQuantizeLinear(x)
        return op.DequantizeLinear(q, s, zp)

    return {torch.ops.lowbit_onnx.dequantize.default: dq,
            torch.ops.lowbit_onnx.qdq.default: qdq,
            torch.ops.lowbit_onnx.dynamic_qdq.default: dynamic_qdq}


# --- the plan: per module, the tensors and attributes of its Q/DQ nodes --------------------
@dataclass
class _WeightDQ:
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    axis: int
    block_size: int
    fmt: str


@dataclass
class _Plan:
    weights: dict[str, _WeightDQ] = field(default_factory=dict)
    acts: dict[str, "_ActQDQ"] = field(default_factory=dict)  # quantizer name -> module
    retype: dict[str, str] = field(default_factory=dict)  # initializer name -> ONNX type
    opset: int = _MIN_OPSET
    why: str = ""  # what needs the opset

    def need(self, opset: int, why: str) -> None:
        if opset > self.opset:
            self.opset, self.why = opset, why


def _weight_dq(name: str, m, plan: _Plan) -> _WeightDQ:
    qt = weight_qtensor(m)
    spec, where = qt.spec, f"{name}.weight ({qt.spec.short()})"
    fmt = spec.element_format
    el = _elem(fmt, where)
    plan.need(el.opset, f"{el.onnx_type} codes ({where})")
    o, k = qt.shape
    lay = Layout(spec, qt.shape)
    scale = qt.scale.float()
    if qt.global_scale is not None:  # NVFP4: lowbit multiplies the two in float32 too
        scale = lay.to_natural(lay.from_natural(scale) * qt.global_scale)
    zp = qt.zero_point
    g = spec.granularity
    axis, block = 0, 0
    if g == "tensor":
        scale = scale.reshape(())
        zp = None if zp is None else zp.reshape(())
    elif g == "channel":
        axis = lay.axis
        scale = scale.reshape(-1)
        zp = None if zp is None else zp.reshape(-1)
    elif g == "group":
        axis, block = lay.axis, spec.group_size
    elif g == "block":
        r, c = spec.block
        scale = scale.repeat_interleave(r, 0)[:o]
        zp = None if zp is None else zp.repeat_interleave(r, 0)[:o]
        axis, block = 1, c
        if c >= k:  # blocks span whole rows (nn.MultiheadAttention's per-part scales):
            # per channel with repeated scales is the same numbers, and no blocked DQ
            axis, block = 0, 0
            scale = scale.reshape(-1)
            zp = None if zp is None else zp.reshape(-1)
    else:
        raise ConfigError(f"ONNX export: {where}: granularity {g!r} for a weight")
    if block:
        plan.need(21, f"blocked scales ({where})")
    storage = _codes_storage(qt.codes, fmt, el)
    zps = None if zp is None else zp.to(torch.int32).to(el.storage).contiguous()
    if el.packed:
        plan.retype[f"{name}._onnx_codes"] = el.onnx_type
        if zps is not None:
            plan.retype[f"{name}._onnx_zero_point"] = el.onnx_type
    return _WeightDQ(storage, scale.contiguous(), zps, axis, block, fmt.name)


class _ActQDQ(nn.Module):
    """Stands in for an activation quantizer during export: Q->DQ (or dynamic) custom ops."""

    def __init__(self, q: TensorQuantizer, where: str, plan: _Plan):
        super().__init__()
        spec = q.spec
        self.dynamic = spec.dynamic
        self.channel_axis = spec.axis if spec.granularity == "channel" else None
        self.fmt = spec.element_format.name
        if spec.dynamic:
            if spec.model_copy(update={"calibrator": _DYNAMIC_UINT8.calibrator,
                                       "calibrator_args": {}}) != _DYNAMIC_UINT8:
                raise ConfigError(
                    f"ONNX export: {where} ({spec.short()}): dynamic activation quantization "
                    "has no QDQ form (only uint8 affine per-tensor, which is "
                    "DynamicQuantizeLinear); calibrate static activations or export "
                    "weight-only")
            return
        if spec.block_format is not None or spec.granularity not in ("tensor", "channel"):
            raise ConfigError(f"ONNX export: {where} ({spec.short()}): static activations "
                              "export per tensor or per channel only")
        fmt = spec.element_format
        el = _elem(fmt, where)
        if not el.exact_range:
            raise ConfigError(f"ONNX export: {where} ({spec.short()}): QuantizeLinear "
                              f"saturates {el.onnx_type} to its full range, not {fmt.name}'s "
                              f"[{fmt.min:g}, {fmt.max:g}]; use int8/uint8/int4/uint4/fp8")
        plan.need(el.opset, f"{el.onnx_type} activations ({where})")
        scale, zp = _static_scale(q)
        zps = torch.zeros_like(scale) if zp is None else zp
        self.register_buffer("scale", scale)
        if fmt.kind == "int":
            self.register_buffer("zero_point", zps.to(torch.int32).to(el.storage))
        else:
            self.register_buffer("zero_point", zps.to(el.storage))
        if el.packed:
            plan.retype[f"{where}.zero_point"] = el.onnx_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return torch.ops.lowbit_onnx.dynamic_qdq(x.float()).to(x.dtype)
        axis = 0 if self.channel_axis is None else self.channel_axis % x.ndim
        y = torch.ops.lowbit_onnx.qdq(x.float(), self.scale, self.zero_point, axis, self.fmt)
        return y.to(x.dtype)


def _static_scale(q: TensorQuantizer):
    """The calibrated scale (+ zero-point) exactly as fake quantization computes it."""
    spec = q.spec
    if q.scale is not None:
        s = q.scale.float().reshape(-1) if spec.granularity == "channel" else \
            q.scale.float().reshape(())
        zp = None if q.zero_point is None else q.zero_point.float().reshape(s.shape)
        return s, zp
    if q.amax is None:
        raise ConfigError(f"ONNX export: {q.qname} ({spec.short()}) is static but was never "
                          "calibrated")
    if spec.granularity == "channel":
        c = q.amax.numel()
        spec = spec.model_copy(update={"axis": 0})
        dummy = torch.zeros(c)
    else:
        dummy = torch.zeros(1)
    lay, _, s, zp, _ = compute_scales(dummy, spec, amax=q.amax.reshape(-1) if
                                      spec.granularity == "channel" else q.amax,
                                      amin=None if q.amin is None else
                                      (q.amin.reshape(-1) if spec.granularity == "channel"
                                       else q.amin))
    shape = (-1,) if spec.granularity == "channel" else ()
    return s.reshape(shape).float(), None if zp is None else zp.reshape(shape)


def _plan(model: nn.Module) -> _Plan:
    plan = _Plan()
    for name, q in quantizers(model):
        if q.role == "kv_cache" and q.is_enabled:
            raise ConfigError(f"ONNX export: {name}: KV-cache quantizers have no ONNX QDQ form "
                              "here; quantize without kv_cache")
    for name, m in quantized_modules(model):
        if m.weight_quantizer.is_enabled:
            plan.weights[name] = _weight_dq(name, m, plan)
        for role in ("input", "output"):
            q = getattr(m, f"{role}_quantizer")
            if q.is_enabled:
                where = f"{name}.{role}_quantizer"
                plan.acts[where] = _ActQDQ(q, where, plan)
    return plan


def _dq_weight(self) -> torch.Tensor:
    """``quantized_weight`` of a module during export: DequantizeLinear of its codes."""
    w = torch.ops.lowbit_onnx.dequantize(self._onnx_codes, self._onnx_scale,
                                         self._onnx_zero_point, self._onnx_axis,
                                         self._onnx_block_size, self._onnx_fmt)
    return self.weight_from_2d(w.to(self.weight.dtype))


@contextmanager
def _patched(model: nn.Module, plan: _Plan) -> Iterator[None]:
    """Swap in the custom-op versions of the quantized modules; restore everything after."""
    mods = dict(model.named_modules())
    saved_cls, saved_q = {}, {}
    try:
        for name, dq in plan.weights.items():
            m = mods[name]
            saved_cls[name] = type(m)
            m.__class__ = type(f"Onnx{type(m).__name__}", (type(m),),
                               {"quantized_weight": _dq_weight})
            m.register_buffer("_onnx_codes", dq.codes)
            m.register_buffer("_onnx_scale", dq.scale)
            m.register_buffer("_onnx_zero_point", dq.zero_point)
            m._onnx_axis, m._onnx_block_size, m._onnx_fmt = dq.axis, dq.block_size, dq.fmt
        for where, act in plan.acts.items():
            parent, attr = where.rsplit(".", 1)
            saved_q[where] = mods[parent]._modules[attr]
            mods[parent]._modules[attr] = act
        yield
    finally:
        for where, q in saved_q.items():
            parent, attr = where.rsplit(".", 1)
            mods[parent]._modules[attr] = q
        for name, cls in saved_cls.items():
            m = mods[name]
            m.__class__ = cls
            for b in ("_onnx_codes", "_onnx_scale", "_onnx_zero_point"):
                m._buffers.pop(b, None)
            for a in ("_onnx_axis", "_onnx_block_size", "_onnx_fmt"):
                m.__dict__.pop(a, None)


# --- after the export: sub-byte initializers -----------------------------------------------
def _retype(model_proto, retype: dict[str, str]) -> None:
    """Rewrite int8/uint8 storage initializers as INT4/UINT4/FLOAT4E2M1 (packed two per byte,
    the first value in the low nibble, as ONNX stores them)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    if not retype:
        return
    found = set()
    for init in model_proto.graph.initializer:
        kind = retype.get(init.name)
        if kind is None:
            continue
        name, dims = init.name, list(init.dims)
        arr = np.ascontiguousarray(numpy_helper.to_array(init)).reshape(-1).view(np.uint8)
        nibbles = torch.from_numpy(arr & 0x0F).unsqueeze(0)
        packed = formats.pack(nibbles, 4).reshape(-1).numpy()
        t = TensorProto()
        t.name, t.data_type = name, getattr(TensorProto, kind)
        t.dims.extend(dims)
        t.raw_data = packed.tobytes()
        init.CopyFrom(t)
        found.add(name)
    missing = set(retype) - found
    if missing:
        raise ConfigError(f"ONNX export: initializers {sorted(missing)} were not found in the "
                          "exported graph (the exporter renamed or folded them)")
    keep = [vi for vi in model_proto.graph.value_info if vi.name not in retype]
    del model_proto.graph.value_info[:]
    model_proto.graph.value_info.extend(keep)


_NAMES = {"._onnx_codes": ".weight_quantized", "._onnx_scale": ".weight_scale",
          "._onnx_zero_point": ".weight_zero_point", ".input_quantizer.scale": ".input_scale",
          ".input_quantizer.zero_point": ".input_zero_point",
          ".output_quantizer.scale": ".output_scale",
          ".output_quantizer.zero_point": ".output_zero_point"}


def _rename(model_proto) -> None:
    """Readable initializer names: ``fc.weight_quantized``, ``fc.weight_scale``,
    ``fc.input_scale`` ... instead of the exporter's buffer names."""
    g = model_proto.graph
    taken = {i.name for i in g.initializer} | {n for node in g.node for n in node.output}
    mapping = {}
    for init in g.initializer:
        for old, new in _NAMES.items():
            if init.name.endswith(old):
                target = init.name[: -len(old)] + new
                if target not in taken:
                    mapping[init.name] = target
                    taken.add(target)
                break
    if not mapping:
        return
    for init in g.initializer:
        init.name = mapping.get(init.name, init.name)
    for node in g.node:
        for i, n in enumerate(node.input):
            if n in mapping:
                node.input[i] = mapping[n]
    for vi in g.value_info:
        vi.name = mapping.get(vi.name, vi.name)


def _scope_of(node) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            return p.value
    return ""


def _name_rotations(model_proto, model: nn.Module) -> None:
    """Check that every online rotation (:mod:`lowbit.nn.rotation`) is an explicit ``MatMul``
    by its constant matrix (a float32 initializer, ``<owner>.<attr>.matrix`` unless the
    exporter merged equal constants; ``[b, b]``, applied to a ``[..., n/b, b]`` view for a
    block-diagonal rotation) and name those nodes ``<owner>.<attr>`` (``<owner>.<attr>/1``
    for the keys of a q/k rotation). Nodes are found by the module scope torch.onnx records
    on them. A rotation the exporter folded or dropped is a ConfigError naming it."""
    from lowbit.nn.rotation import ATTRS, online_rotations

    inits = {i.name for i in model_proto.graph.initializer}
    matmuls = [n for n in model_proto.graph.node
               if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits]
    for key, spec in online_rotations(model).items():
        owner, attr = key.split("#")[0], ATTRS[spec["where"]]
        scope = f"'{owner}.{attr}'" if owner else f"'{attr}'"
        nodes = [n for n in matmuls if scope in _scope_of(n)]
        want = 2 if spec["where"] == "qk" else 1
        if len(nodes) != want:
            raise ConfigError(f"ONNX export: the online rotation of {owner} ({spec['where']}) "
                              f"should be {want} MatMul(s) by a constant matrix in the "
                              f"exported graph, found {len(nodes)}; report this with the model")
        for j, n in enumerate(nodes):
            n.name = f"{owner}.{attr}" + (f"/{j}" if j else "")


# --- export ------------------------------------------------------------------------------
def export(model: nn.Module, out_dir: Path, example_inputs=None, opset: int | None = None,
           input_names=None, output_names=None, dynamic_shapes=None,
           example_kwargs: dict | None = None, tokenizer=None, **unknown) -> None:
    """Write ``model`` (quantized by lowbit, or not) as ``out_dir/model.onnx`` with QDQ nodes.

    ``example_inputs``: a tensor or a tuple of positional inputs to trace with
    (``example_kwargs`` for keyword inputs); ``opset``: the ONNX opset (default: the smallest
    that holds every quantized tensor, at least 18); ``input_names``, ``output_names``,
    ``dynamic_shapes``: passed to ``torch.onnx.export``; ``tokenizer``: saved alongside
    (``save_pretrained``), for the ``input_ids`` an onnxruntime session needs. Any other
    option is a ConfigError naming it.
    """
    reject_unknown(unknown, "export format 'onnx'", accepted_options(export, ("model", "out_dir")))
    import onnx

    if example_inputs is None and not example_kwargs:
        raise ConfigError("ONNX export needs example_inputs=(tensor, ...) to trace the model")
    args = example_inputs if isinstance(example_inputs, tuple) else \
        (() if example_inputs is None else (example_inputs,))
    plan = _plan(model)
    if opset is None:
        opset = plan.opset
    elif opset < plan.opset:
        raise ConfigError(f"ONNX export: opset {opset} is too old for {plan.why}; it needs "
                          f"opset {plan.opset} or newer")
    elif opset < _MIN_OPSET:
        raise ConfigError(f"ONNX export: opset {opset}; torch.onnx's exporter needs "
                          f"{_MIN_OPSET} or newer")
    was_training = model.training
    model.eval()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _patched(model, plan), torch.no_grad(), warnings.catch_warnings():
            # torch's own deprecation notices from inside the exporter
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            prog = torch.onnx.export(model, args, kwargs=example_kwargs, dynamo=True,
                                     opset_version=opset, verbose=False,
                                     custom_translation_table=_translations(opset),
                                     input_names=input_names, output_names=output_names,
                                     dynamic_shapes=dynamic_shapes)
    except Exception as e:
        if "complex-valued" in str(e):  # torch.onnx cannot lower complex tensors
            raise ConfigError(
                "ONNX export: the model computes with complex numbers (e.g. a rotary "
                "embedding written with torch.polar, as DeepSeek-V2's), which torch.onnx's "
                "exporter cannot convert (ONNX has no complex type for these ops)") from e
        raise
    finally:
        quiet.setLevel(level)
        model.train(was_training)
    mp = prog.model_proto
    _retype(mp, plan.retype)
    _rename(mp)
    _name_rotations(mp, model)
    onnx.checker.check_model(mp)
    path = Path(out_dir) / FILENAME
    large = mp.ByteSize() > 1_800_000_000
    onnx.save_model(mp, str(path), save_as_external_data=large,
                    location=FILENAME + ".data" if large else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
