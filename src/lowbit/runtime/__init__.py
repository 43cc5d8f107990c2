"""Real low-bit inference: turn a fake-quantized model into packed layers with fast kernels.

>>> lowbit.quantize(model, "int4-weight-only", group_size=64)   # doctest: +SKIP
>>> lowbit.runtime.convert(model)                              # doctest: +SKIP
Counter({'int4_weight_only': 210})
>>> model = lowbit.load("ckpt/", packed=True)                  # doctest: +SKIP
>>> lowbit.runtime.memory_report(model)["ratio"]               # doctest: +SKIP
1.0

Every quantized ``nn.Linear`` becomes a :class:`PackedLinear` that keeps its weight as codes
and scales (int8, packed int4, float8, packed e2m1 + e4m3/e8m0 block scales ...) and runs the
best kernel for its recipe and device (:mod:`lowbit.runtime.kernels`,
:mod:`lowbit.runtime.cuda`), or the reference path (dequantize at each call). Every quantized
``nn.Conv2d`` with int8 weights becomes a :class:`~lowbit.runtime.conv.PackedConv2d` (int8
codes, dequantized into the convolution; exact); other quantized convs stay fake-quantized,
each named with why in the :class:`ConvertReport`. See
``docs/runtime.md`` for the table of kernels and tolerances. A chosen kernel that fails at
conversion falls back to the reference path with a warning;
:func:`hardware_path_report` (from :mod:`lowbit.hardware`) says which paths ran.
"""

from __future__ import annotations

import ctypes
import sys
from collections import Counter

import torch
from torch import nn

from lowbit.core import QTensor
from lowbit.export.base import weight_qtensor
from lowbit.hardware import hardware_path_report
from lowbit.nn.modules import QuantLinear, QuantMixin
from lowbit.runtime.kernels import (Kernel, LayerInfo, check_act_dtype, get_kernel,
                                    kernel_names, register_kernel, select_kernel)
from lowbit.runtime.decode import FastDecoder, fuse_linears, generate
from lowbit.runtime.packed import PackedLinear
from lowbit.runtime.conv import PackedConv2d, conv_refusal, packed_conv


def layer_info(m: QuantLinear, device=None, act_dtype: torch.dtype | None = None
               ) -> LayerInfo | None:
    """What kernel selection needs to know of ``m`` (None: the layer stays as it is, because
    its weight is not quantized or its output is)."""
    wq, iq = m.weight_quantizer, m.input_quantizer
    if not wq.is_enabled or m.output_quantizer.is_enabled:
        return None
    iq = iq if iq.is_enabled else None
    dev = torch.device(device) if device is not None else m.weight.device
    return LayerInfo(wq.spec, None if iq is None else iq.spec, iq, m.in_features,
                     m.out_features, dev, m.weight.dtype, act_dtype)


def _kernel_for(m: QuantLinear, allow_fast: bool, device=None) -> str:
    """The kernel :func:`convert` gives ``m``, or ``"keep"``."""
    info = layer_info(m, device)
    return "keep" if info is None else select_kernel(info, allow_fast)


def packed_module(m: QuantLinear, qt: QTensor | None = None, fast: bool = True,
                  act_dtype: torch.dtype | None = None, device=None) -> PackedLinear | None:
    """The :class:`PackedLinear` replacing quantized linear ``m`` (None when ``m`` stays).

    ``qt``: its weight's QTensor when already known (a checkpoint's codes); otherwise
    computed from ``m`` (:func:`lowbit.export.weight_qtensor`). ``device``: where the packed
    layer lives and which kernels are eligible (default: ``m``'s weight's device). ``m``'s
    online ``input_rotation`` (:mod:`lowbit.nn.rotation`) moves to the packed layer.
    """
    info = layer_info(m, device, act_dtype)
    if info is None:
        return None
    if qt is None:
        qt = weight_qtensor(m) if m.weight.device.type == "cpu" or _portable(info.weight) \
            else _cpu_weight_qtensor(m)
    # kernel None: PackedLinear picks the kernel (as select_kernel(info)) and falls back to
    # the reference kernel, with a warning, when the chosen one fails its first run
    new = PackedLinear.from_qtensor(qt, m.bias, m.weight.dtype, None if fast else "reference",
                                    info.input_quantizer, info.device, act_dtype)
    rot = m._modules.get("input_rotation")
    if rot is not None:  # the online rotation goes with the layer (see lowbit.nn.rotation)
        new.input_rotation = rot.to(info.device)
    return new


def _portable(spec) -> bool:
    """Whether lowbit.core can quantize to ``spec`` off the CPU (integer and torch-native
    float8 codes; the other minifloats and e8m0 scales encode through CPU tables)."""
    fmt = spec.element_format
    return (fmt.kind == "int" or getattr(fmt, "torch_dtype", None) is not None) and \
        spec.scale_format != "e8m0"


def _cpu_weight_qtensor(m: QuantLinear) -> QTensor:
    """:func:`lowbit.export.weight_qtensor` of ``m`` computed on a CPU copy of its weight."""
    from lowbit.core import quantize

    q = m.weight_quantizer

    def cpu(t):
        return None if t is None else t.detach().cpu()

    w = cpu(m.weight_2d())
    if q.scale is not None:
        return quantize(w, q.spec, scale=cpu(q.scale), zero_point=cpu(q.zero_point),
                        global_scale=cpu(q.global_scale))
    return quantize(w, q.spec)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set submodule ``name`` (dotted) of ``model`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class ConvertReport(Counter):
    """What :func:`convert` did: a Counter ``{kernel: layers}`` (compares equal to a dict)
    plus what it left unpacked, so nothing stays float silently:

    - ``kept``: ``{name: why}`` quantized layers left fake-quantized (output quantizer,
      weight quantizer off, a Conv2d whose weights are not int8, a quantized module type
      with no packed path: Conv1d, GPT-2 ``Conv1D`` ...);
    - ``float``: ``{name: why}`` layers with a weight matrix that stay in float
      (not quantized by the recipe: LM head, MoE routers and shared-expert gates, ...);
    - ``fused_experts``: stacked MoE experts modules never split per expert (float 3-D
      weights: the model was not quantized by :func:`lowbit.quantize`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: dict[str, str] = {}
        self.float: dict[str, str] = {}
        self.fused_experts: list[str] = []

    def lines(self) -> list[str]:
        """Human-readable summary, one line per kind of layer (float layers named)."""
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.items())) or "none"
        out = [f"packed: {sum(self.values())} layers ({kinds})"]
        if self.kept:
            out.append(f"kept fake-quantized: {len(self.kept)}: " +
                       ", ".join(f"{n} ({w})" for n, w in self.kept.items()))
        if self.float:
            out.append(f"float: {len(self.float)}: " +
                       ", ".join(f"{n} ({w})" for n, w in self.float.items()))
        if self.fused_experts:
            out.append(f"MoE experts left fused in float: {', '.join(self.fused_experts)}")
        return out


def _unpacked(model: nn.Module, report: ConvertReport) -> None:
    """Fill ``report.float`` / ``fused_experts`` with what :func:`convert` leaves in float."""
    from lowbit.adapters.experts import fused_experts
    from lowbit.nn.routers import find_routers

    routers = find_routers(model)
    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, PackedConv2d, QuantMixin)) or name in report.kept:
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or isinstance(m, nn.Embedding):
            continue
        if name in routers:
            report.float[name] = f"MoE router: {routers[name]}"
        elif isinstance(m, nn.Linear):
            report.float[name] = "linear not quantized by the recipe"
        else:
            report.float[name] = f"{type(m).__name__} not quantized"
    report.fused_experts = list(fused_experts(model))


def convert(model: nn.Module, fast: bool = True, act_dtype: torch.dtype | None = None
            ) -> ConvertReport:
    """Replace every quantized ``nn.Linear`` of ``model`` by a :class:`PackedLinear` and
    every quantized ``nn.Conv2d`` with int8 weights by a
    :class:`~lowbit.runtime.conv.PackedConv2d` (kernel ``conv_int8``: int8 codes resident,
    dequantized into ``F.conv2d`` at each call, outputs equal to the fake-quantized conv), in
    place, and return how many layers got each kernel, as a :class:`ConvertReport` (which
    also names the layers left fake-quantized, each with why, and those left float).

    MoE models: each expert's ``gate_proj``/``up_proj``/``down_proj`` (split by
    :func:`lowbit.quantize`) becomes its own packed layer, and
    :class:`lowbit.nn.experts.MoEExperts` runs only the experts tokens are routed to;
    routers stay float and are listed in ``report.float``.

    ``fast=False`` uses the reference (dequantize-then-matmul) path for all linear layers
    (convs always take ``conv_int8``, itself dequantize-then-convolve).
    ``act_dtype``: dtype of activations and scales in the CPU weight-only kernels (default
    bfloat16, the only dtype torch vectorizes them for; ``torch.float32`` reproduces the
    fake-quantized model to ~1e-6 but runs 20-100x slower). The float weights of converted
    layers are released; layers with an output quantizer stay fake-quantized.
    """
    check_act_dtype(act_dtype)
    counts = ConvertReport()
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantMixin) and not isinstance(m, QuantLinear):
            new = packed_conv(m)
            if new is None:
                counts.kept[name] = conv_refusal(m)
                continue
            replace_module(model, name, new)
            counts[new.kernel] += 1
            continue
        if not isinstance(m, QuantLinear):
            continue
        new = packed_module(m, None, fast, act_dtype)
        if new is None:
            counts.kept[name] = "output quantized" if m.output_quantizer.is_enabled else \
                "weight not quantized"
            continue
        replace_module(model, name, new)
        counts[new.kernel] += 1
    if counts:
        release_memory()
    _unpacked(model, counts)
    return counts


def release_memory() -> None:
    """Give freed heap memory back to the operating system (glibc's ``malloc_trim``; a no-op
    elsewhere). Packing frees many mid-sized temporaries and the float weights, which glibc
    otherwise keeps mapped: without this the process stays several hundred MB above the
    packed model after :func:`convert` or a packed load of a 135M-parameter model."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl ...)
        pass


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model`` (tied tensors once; tensor
    subclasses counted by the tensors they wrap): the resident weights."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: set[int] = set()
    total = 0
    todo = [t for t in list(model.parameters()) + list(model.buffers()) if t is not None]
    while todo:
        t = todo.pop()
        if isinstance(t, nn.Parameter):
            t = t.data
        if is_traceable_wrapper_subclass(t):  # e.g. torchao's quantized weights: the
            attrs, _ = t.__tensor_flatten__()  # tensors they wrap hold the bytes
            todo.extend(getattr(t, a) for a in attrs if getattr(t, a) is not None)
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def memory_report(model: nn.Module) -> dict:
    """Resident weight memory against the packed size, in bytes.

    ``resident``: :func:`weight_bytes`; ``packed``: the same model with every packed layer's
    weight counted at its packed size (codes + scales as quantized, see
    :func:`lowbit.runtime.storage.packed_nbytes`) instead of what its kernel keeps;
    ``ratio``: resident / packed (1.0 for the reference kernel; the int4 kernels keep
    (scale, zero) pairs in the activation dtype). ``kernels``: per kernel, ``layers``,
    ``resident`` and ``packed`` bytes of the packed weights alone.
    """
    resident = weight_bytes(model)
    kernels: dict[str, dict] = {}
    own = packed = 0
    for m in model.modules():
        if isinstance(m, (PackedLinear, PackedConv2d)):
            r = m.resident_nbytes()
            k = kernels.setdefault(m.kernel, {"layers": 0, "resident": 0, "packed": 0})
            k["layers"] += 1
            k["resident"] += r
            k["packed"] += m.packed_nbytes
            own += r
            packed += m.packed_nbytes
    total_packed = resident - own + packed
    return {"resident": resident, "packed": total_packed,
            "ratio": resident / total_packed if total_packed else 1.0, "kernels": kernels}


def packed_bytes(model: nn.Module) -> int:
    """The packed size of ``model`` in bytes (see :func:`memory_report`)."""
    return memory_report(model)["packed"]


def load_packed(path, device: str = "cpu", fast: bool = True,
                act_dtype: torch.dtype | None = None, model=None) -> nn.Module:
    """A native lowbit checkpoint loaded straight into packed layers (no float weights of
    quantized layers are built): ``lowbit.load(path, device, packed=..., model=model)``
    (``model``: the un-quantized model, or a function building one, for checkpoints that are
    not transformers models; see :func:`lowbit.export.native.load`)."""
    from lowbit.export.native import load

    return load(path, device, packed={"fast": fast, "act_dtype": act_dtype}, model=model)


__all__ = ["ConvertReport", "FastDecoder", "Kernel", "LayerInfo", "PackedConv2d", "PackedLinear",
           "convert",
           "fuse_linears", "generate", "get_kernel", "hardware_path_report", "kernel_names",
           "layer_info", "load_packed", "memory_report", "packed_bytes", "packed_module",
           "register_kernel", "release_memory", "replace_module", "select_kernel", "weight_bytes"]
