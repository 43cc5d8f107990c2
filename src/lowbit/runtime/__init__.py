"""Real low-bit inference: turn a fake-quantized model into packed layers with fast kernels.

>>> lowbit.quantize(model, "int4-weight-only", group_size=64)   # doctest: +SKIP
>>> lowbit.runtime.convert(model)                              # doctest: +SKIP

See :mod:`lowbit.runtime.packed` for the kernels and their tolerance.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lowbit.export.base import weight_qtensor
from lowbit.nn.modules import QuantLinear
from lowbit.runtime.packed import PackedLinear


def _kernel_for(m: QuantLinear, allow_fast: bool) -> str:
    w = m.weight_quantizer.spec if m.weight_quantizer.is_enabled else None
    i = m.input_quantizer.spec if m.input_quantizer.is_enabled else None
    if w is None or m.output_quantizer.is_enabled:
        return "keep"
    if not allow_fast or m.weight.device.type != "cpu":
        return "reference"
    f = w.element_format
    if f.kind == "int" and f.bits == 8 and w.symmetric and w.granularity == "channel" and \
            not f.narrow and w.block_format is None:
        if i is None:
            return "int8_weight_only"
        if i.element_format.kind == "int" and i.element_format.bits == 8 and i.symmetric and \
                i.granularity == "token" and i.dynamic:
            return "w8a8_int8"
    if f.kind == "int" and f.bits == 4 and f.is_signed and w.granularity == "group" and \
            i is None and w.group_size in (32, 64, 128, 256) and \
            m.in_features % w.group_size == 0 and m.out_features % 32 == 0:
        return "int4_weight_only"
    return "reference"


def convert(model: nn.Module, fast: bool = True) -> Counter:
    """Replace every quantized ``nn.Linear`` by a :class:`PackedLinear` (in place).

    ``fast=False`` uses the reference (dequantize-then-matmul) path for all layers. Returns
    how many layers got each kernel. The float weights of converted layers are released.
    """
    counts: Counter = Counter()
    for name, m in list(model.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        kernel = _kernel_for(m, fast)
        if kernel == "keep":
            continue
        qt = weight_qtensor(m)
        dtype = m.weight.dtype
        bias = m.bias
        if kernel == "int8_weight_only":
            new = PackedLinear.int8_weight_only(qt, bias, dtype)
        elif kernel == "int4_weight_only":
            new = PackedLinear.int4_weight_only(qt, bias, dtype)
        elif kernel == "w8a8_int8":
            new = PackedLinear.w8a8_int8(qt, m.input_quantizer.spec, bias, dtype)
        else:
            iq = m.input_quantizer if m.input_quantizer.is_enabled else None
            new = PackedLinear.reference(qt, bias, dtype, iq)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        counts[kernel] += 1
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors once): the resident weights."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = ["PackedLinear", "convert", "weight_bytes"]
del torch
