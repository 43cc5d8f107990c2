"""Packed storage of one quantized weight: codes and scales as stored, nothing dequantized.

:func:`pack_weight` turns a :class:`~lowbit.core.QTensor` of a 2-D ``[out, in]`` weight into
the tensors the reference kernel keeps resident, one byte or less per value:

============================== ===========================================================
element format                 ``codes``
============================== ===========================================================
``int8`` / ``uint8``           ``torch.int8`` / ``torch.uint8`` ``[out, in]`` (the bits of
                               lowbit's code)
``fp8_e4m3`` / ``fp8_e5m2``    ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` ``[out, in]``
narrower (int2..int7, fp6,     ``uint8 [out, packed_size(in, bits)]``, packed along the
e2m1 of nvfp4 / mxfp4)         input dimension (:mod:`lowbit.formats.packing`)
============================== ===========================================================

``scale`` keeps the stored layout of :mod:`lowbit.core.layout` in its scale format's own
dtype: float32 / float16 / bfloat16, ``e4m3`` as ``torch.float8_e4m3fn`` and ``e8m0`` as
``torch.float8_e8m0fnu`` (1 byte each; both convert to float32 exactly). Affine zero-points
are integer codes of the element format packed flat (``bits`` per group); NVFP4 adds its
float32 per-tensor ``global_scale``. So the resident bytes equal :func:`packed_nbytes`, the
size of the codes and scales themselves (what ``QTensor.nbytes`` counts).

:func:`dequantize_packed` rebuilds the float weight at each call: on the CPU through
:func:`lowbit.core.dequantize` (the definition), elsewhere by the same arithmetic with the
format's decode table moved to the device (the tests check both agree bit for bit).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lowbit import formats
from lowbit.core import Layout, QTensor, QuantSpec, dequantize
from lowbit.errors import FormatError

_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "e4m3": torch.float8_e4m3fn, "e8m0": torch.float8_e8m0fnu}


def packed_nbytes(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Bytes of the packed codes + scales (+ zero-points, + NVFP4's global scale) of a weight
    of ``shape`` quantized with ``spec``: codes packed along the last axis, one scale per
    scale unit in its scale format, zero-points at ``bits`` each, 4 bytes of global scale."""
    fmt = spec.element_format
    rows = math.prod(shape[:-1])
    n = rows * formats.packed_size(shape[-1], fmt.bits)
    units = math.prod(Layout(spec, shape).natural_shape())
    n += units * spec.scale_bits() // 8
    if not spec.symmetric:
        n += formats.packed_size(units, fmt.bits)
    bf = spec.block_format
    if bf is not None and bf.global_scale:
        n += 4
    return n


def pack_weight(qt: QTensor) -> dict[str, torch.Tensor | None]:
    """The packed tensors (``codes``, ``scale``, ``zero_point``, ``global_scale``) of ``qt``
    (a 2-D ``[out, in]`` QTensor); see the module doc for their dtypes and shapes."""
    if len(qt.shape) != 2:
        raise FormatError(f"packed weights are 2-D [out, in]; got shape {list(qt.shape)}")
    fmt = qt.element_format
    torch_dt = getattr(fmt, "torch_dtype", None)
    if torch_dt is not None:
        codes = qt.codes.contiguous().view(getattr(torch, torch_dt))
    elif fmt.bits == 8:
        codes = qt.codes.contiguous().view(torch.int8 if fmt.is_signed else torch.uint8)
    else:
        codes = formats.pack(qt.codes, fmt.bits)
    sf = qt.spec.scale_format
    sc = qt.scale_codes()
    scale = sc.view(_SCALE_DTYPES[sf]) if sc is not None else qt.scale.to(_SCALE_DTYPES[sf])
    zp = None
    if qt.zero_point is not None:
        zp = formats.pack(fmt.encode(qt.zero_point.float()).reshape(-1), fmt.bits)
    gs = None if qt.global_scale is None else qt.global_scale.float().reshape(())
    return {"codes": codes.contiguous(), "scale": scale.contiguous(),
            "zero_point": zp, "global_scale": gs}


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` of packed rows (inverse of :func:`lowbit.formats.pack`), on
    ``packed``'s device: 8- and 4-bit codes with tensor ops there, other widths through
    :func:`lowbit.formats.unpack` on the CPU."""
    if bits == 8:
        return packed.view(torch.uint8)
    if bits == 4 and n % 2 == 0 and packed.shape[-1] == n // 2:
        # byte k = code[2k] | code[2k + 1] << 4 (formats.packing's bit order)
        return torch.stack((packed & 15, packed >> 4), -1).reshape(*packed.shape[:-1], n)
    if packed.device.type == "cpu":
        return formats.unpack(packed, bits, n)
    return formats.unpack(packed.cpu(), bits, n).to(packed.device)


@lru_cache(maxsize=None)
def _table(fmt: formats.Format, device: torch.device) -> torch.Tensor:
    return fmt.table().to(device)


def _decode(fmt: formats.Format, codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 ``codes`` on their device (``fmt.decode`` off the CPU)."""
    if fmt.kind == "int":
        return fmt.decode(codes)
    dt = getattr(fmt, "torch_dtype", None)
    if dt is not None:
        return codes.view(getattr(torch, dt)).float()
    return _table(fmt, codes.device)[codes.long() & (2**fmt.bits - 1)]


def stored_qtensor(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   global_scale: torch.Tensor | None, spec: QuantSpec, shape: tuple[int, int],
                   dtype: torch.dtype) -> QTensor:
    """The :class:`QTensor` (unpacked uint8 codes, float32 scales, int32 zero-points) of the
    packed tensors of :func:`pack_weight`."""
    fmt = spec.element_format
    if codes.is_floating_point():  # fp8 stored as a torch float8 dtype
        u8 = codes.view(torch.uint8)
    else:
        u8 = unpack_codes(codes.view(torch.uint8), fmt.bits, shape[-1])
    s = scale.float()
    zp = None
    if zero_point is not None:
        zp = fmt.code_to_int(unpack_codes(zero_point, fmt.bits, s.numel())).reshape(s.shape)
    return QTensor(u8, s, zp, spec, tuple(shape), dtype, global_scale)


def dequantize_packed(buffers: dict[str, torch.Tensor | None], spec: QuantSpec,
                      shape: tuple[int, int], dtype: torch.dtype,
                      device_path: bool | None = None) -> torch.Tensor:
    """The float weight ``[out, in]`` in ``dtype`` of the packed tensors ``buffers`` (keys of
    :func:`pack_weight`), equal bit for bit to ``dequantize`` of the original QTensor.

    ``device_path`` (default: off the CPU) uses the device-side arithmetic instead of
    :func:`lowbit.core.dequantize` (for tests on the CPU)."""
    qt = stored_qtensor(buffers["codes"], buffers["scale"], buffers.get("zero_point"),
                        buffers.get("global_scale"), spec, shape, dtype)
    if device_path is None:
        device_path = qt.codes.device.type != "cpu"
    if not device_path:
        return dequantize(qt)
    # lowbit.core.dequantize, step for step, with a device-side decode table
    lay = Layout(spec, qt.shape)
    vals = lay.view(_decode(spec.element_format, qt.codes))
    s = lay.from_natural(qt.scale)
    if qt.global_scale is not None:
        s = s * qt.global_scale
    if qt.zero_point is not None:
        vals = vals - lay.from_natural(qt.zero_point.float())
    return lay.unview(vals * s).to(dtype)



class PackedBuffersMixin:
    """For ``nn.Module`` layers that keep a packed weight in buffers (PackedLinear,
    PackedConv2d): byte accounting, and casts that leave codes and scales alone."""

    def resident_nbytes(self) -> int:
        """Bytes of this layer's own buffers (the packed weight as the kernel keeps it)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values()
                   if b is not None)

    def _apply(self, fn, recurse=True):
        # casts (model.half(), .to(bfloat16)) must not touch codes and scales: a buffer
        # whose dtype fn would change only follows fn's device
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for k, b in before.items():
            nb = self._buffers.get(k)
            if b is not None and nb is not None and nb.dtype != b.dtype:
                self._buffers[k] = b.to(nb.device)
        return self
