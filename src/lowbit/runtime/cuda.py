"""GPU kernels of :class:`~lowbit.runtime.PackedLinear` (used only for weights on CUDA).

* ``fp8_scaled_mm``: FP8 E4M3 weights (per tensor or per output channel) with FP8 E4M3
  activations (static per tensor, or dynamic per token), ``torch._scaled_mm``. The weight is
  stored ``[out, in]`` row-major, so ``w.t()`` is the column-major ``[in, out]`` operand
  cuBLASLt wants; activations are quantized by :func:`lowbit.core.quantize`. Per-tensor
  scales on both sides use tensor-wise scaling (output in the model's dtype); any per-token or
  per-channel scale uses row-wise scaling (``scale_a [M, 1]`` and ``scale_b [1, out]``,
  float32, the other side's per-tensor scale broadcast; output bfloat16, then the model's
  dtype). Needs compute capability 8.9 (9.0 for row-wise) and ``in``, ``out`` multiples of
  16; other layers fall back to ``reference``.
* ``int4_weight_only_cuda``: int4 grouped weights (groups of 32..256, symmetric or affine),
  no input quantizer: torch's tinygemm kernel ``torch._weight_int4pack_mm`` with bfloat16
  activations; ``torch._convert_weight_to_int4pack`` packs the codes once (``uint8 [out,
  in / 2]`` with even input indices in the high nibble, ``innerKTiles`` 8/4/2) and the
  scales and zeros are ``[G, out, 2]`` bfloat16 (``w = (q_u - 8) * scale + zero``, as on the
  CPU). Needs compute capability 8.0, ``in`` a multiple of ``16 * innerKTiles`` and ``out``
  a multiple of 8.
* ``w8a8_int8`` (shared with the CPU, :mod:`lowbit.runtime.kernels`): ``torch._int_mm``
  on CUDA pads decode batches to 17 rows.

These CUDA paths ran once, on an NVIDIA H200 with torch 2.11 (2026-12-04):
``tests/runtime/test_gpu.py`` (marked ``gpu``, skipped without CUDA, as in CI) passed, and it
fails unless each kernel is the path taken. A kernel whose torch op raises when a layer is converted falls back to the
reference kernel with one warning (:mod:`lowbit.runtime.packed`, :mod:`lowbit.hardware`).

The activations on these paths are not checked for NaN/Inf (that would cost a host sync per
call); the fake-quantized model raises a FormatError on them instead.
"""

from __future__ import annotations

import torch

from lowbit.core import QTensor, quantize
from lowbit.runtime.kernels import (Kernel, LayerInfo, int4_grouped, int4_scale_zeros,
                                    is_channel_weight, plain_input, register_kernel)

INNER_K_TILES = (8, 4, 2)


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def _is_e4m3(spec) -> bool:
    return spec is not None and spec.block_format is None and spec.format == "fp8_e4m3" \
        and spec.symmetric


class FP8ScaledMM(Kernel):
    """FP8 W8A8 with ``torch._scaled_mm`` (tensor-wise or row-wise scales)."""

    name = "fp8_scaled_mm"
    devices = ("cuda",)

    @staticmethod
    def _rowwise(info: LayerInfo) -> bool:
        return info.weight.granularity != "tensor" or info.input.granularity != "tensor"

    def supports(self, info: LayerInfo) -> bool:  # noqa: D102
        w = info.weight
        if not (_is_e4m3(w) and (w.granularity == "tensor" or is_channel_weight(w)) and
                _is_e4m3(info.input) and plain_input(info)):
            return False
        if info.in_features % 16 or info.out_features % 16:
            return False
        need = (9, 0) if self._rowwise(info) else (8, 9)
        return _capability(info.device) >= need

    def build(self, layer, qt: QTensor, info: LayerInfo) -> None:  # noqa: D102
        layer.register_buffer("w_fp8", qt.codes.contiguous().view(torch.float8_e4m3fn))
        layer.register_buffer("w_scale", qt.scale.float().reshape(-1).contiguous())  # [1|out]
        layer.register_buffer("act_amax", None if info.input_amax() is None else
                              info.input_amax().detach().float().clone())
        layer.act_spec = info.input
        layer.rowwise = self._rowwise(info)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        qx = quantize(x, layer.act_spec, amax=layer.act_amax, check_finite=False)
        a = qx.codes.view(torch.float8_e4m3fn)  # [M, in], row-major
        b = layer.w_fp8.t()  # [in, out], column-major
        sa = qx.scale.float()
        if not layer.rowwise:
            out = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else \
                torch.bfloat16
            return torch._scaled_mm(a, b, scale_a=sa.reshape(()),
                                    scale_b=layer.w_scale.reshape(()), out_dtype=out)
        m, n = a.shape[0], b.shape[1]
        sa = sa.reshape(-1, 1).expand(m, 1).contiguous()
        sb = layer.w_scale.reshape(1, -1).expand(1, n).contiguous()
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


class Int4WeightOnlyCUDA(Kernel):
    """int4 grouped weights x bfloat16 activations: tinygemm (``_weight_int4pack_mm``)."""

    name = "int4_weight_only_cuda"
    devices = ("cuda",)

    @staticmethod
    def _tiles(k: int) -> int | None:
        return next((t for t in INNER_K_TILES if k % (16 * t) == 0), None)

    def supports(self, info: LayerInfo) -> bool:  # noqa: D102
        return int4_grouped(info) and info.out_features % 8 == 0 and \
            self._tiles(info.in_features) is not None and _capability(info.device) >= (8, 0)

    def build(self, layer, qt: QTensor, info: LayerInfo) -> None:  # noqa: D102
        q_u = (qt.element_format.code_to_int(qt.codes) + 8).to(torch.int32)  # [out, in]
        pairs = (q_u[:, ::2] << 4 | q_u[:, 1::2]).to(torch.uint8).contiguous()
        tiles = self._tiles(qt.shape[1])
        layer.register_buffer("w_packed", torch._convert_weight_to_int4pack(pairs, tiles))
        layer.register_buffer("scale_zeros", int4_scale_zeros(qt, torch.bfloat16))
        layer.group_size = qt.spec.group_size

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), layer.w_packed,
                                         layer.group_size, layer.scale_zeros)


for _k in (FP8ScaledMM(), Int4WeightOnlyCUDA()):
    register_kernel(_k)
