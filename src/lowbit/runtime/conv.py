"""``PackedConv2d``: a Conv2d whose weight stays as int8 codes and scales.

:func:`lowbit.runtime.convert` (and ``lowbit.load(path, packed=True)``) replace each
quantized ``nn.Conv2d`` (:class:`~lowbit.nn.QuantConv2d`) whose weight is int8 by a
:class:`PackedConv2d` with kernel ``conv_int8``:

* storage: the weight's int8 codes ``[out, in/groups * kh * kw]`` (one byte per value) and
  its scales as quantized (float32 per output channel, per tensor, or per group along the
  input; affine zero-points packed), see :mod:`lowbit.runtime.storage`;
* compute: at each call the weight is dequantized (:func:`lowbit.core.dequantize`, the
  definition, so it equals the fake-quantized weight bit for bit) into ``F.conv2d`` with the
  layer's stride, padding (any ``padding_mode``), dilation and groups (depthwise included);
  the layer's input quantizer (static or dynamic int8, fp8 ...) is kept and applied as in the
  fake-quantized model. Outputs therefore equal :class:`~lowbit.nn.QuantConv2d`'s bit for bit
  on the same device and dtype (tolerance 0; measured in ``tests/runtime/test_convert_conv.py``).

What it does not take, and :func:`conv_refusal` names in the :class:`ConvertReport`'s
``kept`` (the layer stays fake-quantized, never silently): weights that are not 8-bit signed
integers (int4, fp8, nvfp4, mxfp ...: no packed conv kernel for them yet), layers with an
output quantizer, layers whose weight quantizer is off, and ``Conv1d`` / ``Conv3d``. There is
no int8 x int8 (im2col + integer matmul) path yet: activations are not run in integer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QTensor, QuantSpec
from lowbit.errors import ConfigError
from lowbit.runtime.storage import (PackedBuffersMixin, dequantize_packed, pack_weight,
                                    packed_nbytes)

KERNEL = "conv_int8"


def conv_refusal(m: nn.Module) -> str | None:
    """Why quantized conv ``m`` cannot become a :class:`PackedConv2d` (one line), or None
    when it can."""
    from lowbit.nn.modules import QuantConv2d

    kind = type(m).__name__
    if not isinstance(m, QuantConv2d):
        return (f"{kind}: no packed path for this module type (Linear and int8 Conv2d "
                "pack); stays fake-quantized")
    if not m.weight_quantizer.is_enabled:
        return "weight not quantized"
    if m.output_quantizer.is_enabled:
        return "output quantized"
    return spec_refusal(m.weight_quantizer.spec)


def spec_refusal(spec: QuantSpec) -> str | None:
    """Why a Conv2d weight quantized with ``spec`` has no packed path (None: int8 packs)."""
    fmt = spec.element_format
    if spec.block_format is None and fmt.kind == "int" and fmt.bits == 8 and fmt.is_signed:
        return None
    return (f"Conv2d with {spec.short()} weights: the packed conv path ({KERNEL}) takes "
            f"int8 weights only; stays fake-quantized")


class PackedConv2d(PackedBuffersMixin, nn.Module):
    """``y = conv2d(Qi(x), dequantize(codes, scales)) + b`` with the weight kept as int8
    codes. ``x [N, C_in, H, W] -> [N, C_out, H', W']`` as ``nn.Conv2d``.

    Build it with :meth:`from_qtensor` (or :func:`lowbit.runtime.convert`).
    ``packed_nbytes``: bytes of the codes and scales as quantized.
    """

    kernel = KERNEL

    def __init__(self, conv: nn.Conv2d, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self.weight_shape = tuple(conv.weight.shape)
        self.compute_dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.input_quantizer = None
        self.spec = None
        self.packed_nbytes = 0

    @classmethod
    def from_qtensor(cls, qt: QTensor, conv: nn.Conv2d, input_quantizer: nn.Module | None = None,
                     device=None, dtype: torch.dtype | None = None) -> "PackedConv2d":
        """A packed conv for the 2-D ``[out, in/groups * kh * kw]`` int8 QTensor ``qt`` of
        ``conv``'s weight (geometry and bias from ``conv``). ``input_quantizer``: the layer's
        enabled input quantizer, applied as in the fake-quantized model. ``device``: where
        the layer lives (default: ``qt``'s); ``dtype``: the compute dtype (default: the
        conv's weight dtype). A weight the path does not take is a ConfigError."""
        why = spec_refusal(qt.spec)
        if why is not None:
            raise ConfigError(why)
        k = conv.weight[0].numel()
        if tuple(qt.shape) != (conv.out_channels, k):
            raise ConfigError(f"PackedConv2d needs a [{conv.out_channels}, {k}] weight for "
                              f"{tuple(conv.weight.shape)}; got shape {list(qt.shape)}")
        device = torch.device(device) if device is not None else qt.codes.device
        m = cls(conv, conv.bias, dtype or conv.weight.dtype)
        with torch.no_grad():
            for name, t in pack_weight(qt).items():
                m.register_buffer(name, t)
        if input_quantizer is not None and getattr(input_quantizer, "is_enabled", True):
            m.input_quantizer = input_quantizer
        m.spec = qt.spec
        m.packed_nbytes = packed_nbytes(qt.spec, qt.shape)
        return m.to(device)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``[out, in/groups, kh, kw]`` in the compute dtype (equal to the
        fake-quantized weight bit for bit)."""
        w = dequantize_packed({"codes": self.codes, "scale": self.scale,
                               "zero_point": self.zero_point,
                               "global_scale": self.global_scale}, self.spec,
                              (self.weight_shape[0], self.weight_shape[1] *
                               self.weight_shape[2] * self.weight_shape[3]),
                              self.compute_dtype)
        return w.reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``nn.Conv2d`` with the quantized input and weight."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, kernel={self.kernel}")


def packed_conv(m: nn.Module, qt: QTensor | None = None, device=None) -> PackedConv2d | None:
    """The :class:`PackedConv2d` replacing quantized conv ``m`` (None when
    :func:`conv_refusal` says it stays). ``qt``: its weight's QTensor when known (a
    checkpoint's codes), else computed from ``m``."""
    if conv_refusal(m) is not None:
        return None
    if qt is None:
        from lowbit.export.base import weight_qtensor

        qt = weight_qtensor(m)
    iq = m.input_quantizer if m.input_quantizer.is_enabled else None
    return PackedConv2d.from_qtensor(qt, m, iq, device if device is not None else
                                     m.weight.device)
