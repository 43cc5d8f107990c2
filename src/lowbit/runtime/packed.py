"""Packed linear layers that keep weights as codes and compute with real low-bit kernels.

Kernels (chosen per layer by :func:`lowbit.runtime.convert`):

* ``int8_weight_only``: int8 per-channel weights, ``torch._weight_int8pack_mm`` (CPU);
* ``int4_weight_only``: int4 grouped weights (symmetric or affine), packed by
  ``torch._convert_weight_to_int4pack_for_cpu`` and multiplied by
  ``torch._weight_int4pack_mm_for_cpu`` (``x = (q_u - 8) * scale + zero``, with
  ``q_u = code + 8`` and ``zero = -zero_point * scale``);
* ``w8a8_int8``: int8 per-channel weights and dynamic per-token int8 activations (quantized by
  :func:`lowbit.core.quantize`), ``torch._int_mm`` (int32 accumulation), rescaled by both
  scales;
* ``reference``: any format: codes and scales kept packed, dequantized (``lowbit.core``) at
  each call and multiplied in float; input quantizers kept as they are.

Outputs match the fake-quantized model up to the order of floating-point operations (the
kernels scale after the dot product instead of before): relative differences of order 1e-6
in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import formats
from lowbit.core import QTensor, QuantSpec, dequantize, quantize


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored as low-bit codes; see the module doc."""

    def __init__(self, kernel: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.kernel = kernel
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.input_quantizer = None
        self.qt_meta = None

    # --- builders -----------------------------------------------------------------------------
    @classmethod
    def int8_weight_only(cls, qt: QTensor, bias, dtype) -> "PackedLinear":
        """From a per-channel symmetric int8 QTensor of a ``[out, in]`` weight."""
        m = cls("int8_weight_only", qt.shape[1], qt.shape[0], bias, dtype)
        fmt = qt.element_format
        m.register_buffer("w_int8", fmt.code_to_int(qt.codes).to(torch.int8).contiguous())
        m.register_buffer("w_scale", qt.scale.reshape(-1).to(dtype).contiguous())
        return m

    @classmethod
    def int4_weight_only(cls, qt: QTensor, bias, dtype) -> "PackedLinear":
        """From a grouped int4 QTensor (symmetric or affine) of a ``[out, in]`` weight."""
        out_f, in_f = qt.shape
        m = cls("int4_weight_only", in_f, out_f, bias, dtype)
        fmt = qt.element_format
        q_u = (fmt.code_to_int(qt.codes) + 8).to(torch.int32).contiguous()
        m.register_buffer("w_packed", torch._convert_weight_to_int4pack_for_cpu(q_u, 1))
        scale = qt.scale.float()  # [out, G]
        zero = torch.zeros_like(scale) if qt.zero_point is None else \
            -qt.zero_point.float() * scale
        m.register_buffer("scale_zeros", torch.stack([scale.t(), zero.t()], -1)
                          .to(dtype).contiguous())  # [G, out, 2]
        m.group_size = qt.spec.group_size
        return m

    @classmethod
    def w8a8_int8(cls, qt: QTensor, act_spec: QuantSpec, bias, dtype) -> "PackedLinear":
        """From a per-channel int8 weight and a dynamic per-token int8 activation spec."""
        m = cls("w8a8_int8", qt.shape[1], qt.shape[0], bias, dtype)
        fmt = qt.element_format
        m.register_buffer("w_int8_t", fmt.code_to_int(qt.codes).to(torch.int8).t().contiguous())
        m.register_buffer("w_scale", qt.scale.reshape(1, -1).float().contiguous())
        m.act_spec = act_spec
        return m

    @classmethod
    def reference(cls, qt: QTensor, bias, dtype, input_quantizer=None) -> "PackedLinear":
        """Any format: packed codes + scales, dequantized at each call."""
        m = cls("reference", qt.shape[1], qt.shape[0], bias, dtype)
        m.register_buffer("codes", qt.packed_codes())
        m.register_buffer("scale", qt.scale)
        m.register_buffer("zero_point", qt.zero_point)
        m.register_buffer("global_scale", qt.global_scale)
        m.spec = qt.spec
        m.input_quantizer = input_quantizer
        return m

    # --- forward ------------------------------------------------------------------------------
    def _dequantized(self) -> torch.Tensor:
        fmt = self.spec.element_format
        codes = formats.unpack(self.codes, fmt.bits, self.in_features)
        qt = QTensor(codes, self.scale, self.zero_point, self.spec,
                     (self.out_features, self.in_features), self.compute_dtype, self.global_scale)
        return dequantize(qt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x W^T + b`` with the packed weight; ``x [..., in]`` -> ``[..., out]``."""
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "int8_weight_only":
            y = torch._weight_int8pack_mm(x2.to(self.compute_dtype), self.w_int8, self.w_scale)
        elif self.kernel == "int4_weight_only":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(self.compute_dtype), self.w_packed,
                                                  self.group_size, self.scale_zeros)
        elif self.kernel == "w8a8_int8":
            qx = quantize(x2, self.act_spec)
            xi = self.act_spec.element_format.code_to_int(qx.codes).to(torch.int8)
            if xi.shape[0] <= 16:  # _int_mm wants more than 16 rows: pad (decode is 1 row)
                pad = 17 - xi.shape[0]
                acc = torch._int_mm(F.pad(xi, (0, 0, 0, pad)), self.w_int8_t)[: xi.shape[0]]
            else:
                acc = torch._int_mm(xi, self.w_int8_t)
            y = (acc.float() * qx.scale.float() * self.w_scale).to(x.dtype)
        else:
            if self.input_quantizer is not None:
                x2 = self.input_quantizer(x2)
            y = F.linear(x2, self._dequantized().to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel={self.kernel}"
