"""The kernels of :class:`~lowbit.runtime.PackedLinear`: one registry, one entry per
(format, device) pair, chosen per layer by :func:`select_kernel`.

A kernel says which layers it takes (:meth:`Kernel.supports`, from the layer's specs, shape
and device), stores the weight the way its matmul wants it (:meth:`Kernel.build`, once, at
conversion) and multiplies (:meth:`Kernel.forward`, ``x [M, in] -> y [M, out]``, bias
excluded). The first registered kernel that supports a layer wins; ``reference`` takes
every layer no other kernel takes.

CPU kernels (this file):

* ``int8_weight_only``: int8 per-channel symmetric weights, no input quantizer:
  ``torch._weight_int8pack_mm`` for decode-sized batches (< 32 rows, in_features a multiple of 16), dequantize + GEMM for
  larger ones (2-3x faster there) and outside bfloat16;
* ``int4_weight_only``: int4 grouped weights (groups of 32/64/128/256 along the input,
  symmetric or affine), no input quantizer: ``torch._convert_weight_to_int4pack_for_cpu``
  once, ``torch._weight_int4pack_mm_for_cpu`` per call (``x = (q_u - 8) * scale + zero``
  with ``q_u = code + 8`` and ``zero = -zero_point * scale``) for decode-sized batches;
  from :data:`INT4_GEMM_ROWS` rows (prefill) in bfloat16, the packed weight is dequantized
  to a transient bfloat16 ``W^T`` by lowbit's native helper
  (:func:`lowbit.runtime.native.dequant_int4pack_t`, one layer at a time: nothing stays
  resident) and multiplied by the GEMM (torch's int4 CPU kernel is a GEMV, ~3x slower than
  the bfloat16 GEMM on a 512-token prompt); without the native helper (no C compiler,
  ``LOWBIT_NATIVE=0``) torch's kernel takes every batch, recorded as
  ``runtime.int4_prefill_gemm`` in :func:`lowbit.hardware.hardware_path_report`;
* ``w8a8_int8`` (CPU and CUDA): int8 per-channel weights with int8 symmetric activations,
  dynamic per token or static per tensor: activations quantized by
  :func:`lowbit.core.quantize`, ``torch._int_mm`` (int32 accumulation), rescaled by both
  scales in float32; decode rows on the CPU quantized by :func:`lowbit.core.int_rows` (the
  same codes) and multiplied by the int8 GEMV (see :class:`W8A8Int8`);
* ``reference`` (any device, any format): packed codes and scales (see
  :mod:`lowbit.runtime.storage`), dequantized at each call and multiplied in the model's
  dtype; the layer's input quantizer is kept and applied as in the fake-quantized model.

The two weight-only CPU kernels take activations and scales in ``act_dtype`` (bfloat16 by
default): torch's packed-weight CPU kernels are vectorized for bfloat16 only, and run
20-100x slower in float32 or float16. GPU kernels live in :mod:`lowbit.runtime.cuda`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.core import QTensor, QuantSpec, int_rows, quantize
from lowbit.errors import ConfigError
from lowbit.hardware import fell_back, not_attempted, took_hardware
from lowbit.runtime import native
from lowbit.runtime.storage import dequantize_packed, pack_weight


@dataclass(frozen=True)
class LayerInfo:
    """What kernel selection looks at: the specs, the shape and the target device.

    ``input_quantizer`` is the layer's enabled input quantizer (or None); ``act_dtype`` the
    dtype the CPU weight-only kernels compute in (None: bfloat16).
    """

    weight: QuantSpec
    input: QuantSpec | None
    input_quantizer: object | None
    in_features: int
    out_features: int
    device: torch.device
    dtype: torch.dtype
    act_dtype: torch.dtype | None = None

    def input_amax(self):
        """The calibrated amax of a static input quantizer (None for dynamic ones)."""
        iq = self.input_quantizer
        return None if iq is None or self.input.dynamic else iq.amax


class Kernel:
    """One matmul implementation for packed weights; subclasses register themselves."""

    name = ""
    devices: tuple[str, ...] = ()  # device types it runs on; () = any
    keeps_input_quantizer = False

    def supports(self, info: LayerInfo) -> bool:
        """Whether this kernel computes ``info``'s layer (as the fake-quantized model does)."""
        raise NotImplementedError

    def build(self, layer, qt: QTensor, info: LayerInfo) -> None:
        """Register the kernel's buffers on ``layer`` from the weight's QTensor (on the
        target device)."""
        raise NotImplementedError

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """``x [M, in] -> x W^T [M, out]`` (no bias), in any float dtype."""
        raise NotImplementedError


_KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the registry (before ``reference``, which stays last)."""
    if kernel.name in _KERNELS:
        raise ConfigError(f"kernel {kernel.name!r} is registered twice")
    ref = _KERNELS.pop("reference", None)
    _KERNELS[kernel.name] = kernel
    if ref is not None:
        _KERNELS["reference"] = ref
    return kernel


def get_kernel(name: str) -> Kernel:
    """The kernel called ``name`` (ConfigError naming the choices if unknown)."""
    try:
        return _KERNELS[name]
    except KeyError:
        raise ConfigError(f"unknown kernel {name!r}; expected one of: "
                          f"{', '.join(_KERNELS)}") from None


def kernel_names() -> list[str]:
    """Registered kernels in selection order (``reference`` last)."""
    return list(_KERNELS)


def select_kernel(info: LayerInfo, fast: bool = True) -> str:
    """The first registered kernel for ``info.device`` that supports the layer, else
    ``reference``; ``fast=False`` always gives ``reference``."""
    if fast:
        dev = info.device.type
        for k in _KERNELS.values():
            if k.name != "reference" and (not k.devices or dev in k.devices) and \
                    k.supports(info):
                return k.name
    return "reference"


# --- spec predicates ---------------------------------------------------------------------
def is_int(spec: QuantSpec | None, bits: int, symmetric: bool | None = True) -> bool:
    """``spec`` is a signed ``bits``-bit integer spec (symmetric unless ``symmetric`` is None
    or False), without a block format."""
    if spec is None or spec.block_format is not None:
        return False
    f = spec.element_format
    return f.kind == "int" and f.bits == bits and f.is_signed and \
        (symmetric is None or spec.symmetric == symmetric)


def is_channel_weight(spec: QuantSpec) -> bool:
    """One scale per output channel of a ``[out, in]`` weight."""
    return spec.granularity == "channel" and spec.axis in (0, -2)


def plain_input(info: LayerInfo, granularities: tuple[str, ...] = ("token", "tensor")) -> bool:
    """The input quantizer computes its scale per token (dynamic) or per tensor (static,
    calibrated), with no fixed scales: what a fused activation quantizer can reproduce."""
    i, iq = info.input, info.input_quantizer
    if i is None or iq is None or getattr(iq, "scale", None) is not None:
        return False
    if i.dynamic:
        return i.granularity == "token" and "token" in granularities
    return i.granularity == "tensor" and "tensor" in granularities and i.symmetric and \
        getattr(iq, "amax", None) is not None


ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_act_dtype(dtype) -> None:
    """ConfigError unless ``dtype`` is None or a float dtype the weight-only kernels take."""
    if dtype is not None and dtype not in ACT_DTYPES:
        raise ConfigError(f"act_dtype {dtype!r}; expected None or one of: "
                          f"{', '.join(str(d) for d in ACT_DTYPES)}")


def act_dtype(info: LayerInfo) -> torch.dtype:
    """The dtype a weight-only CPU kernel computes in (default bfloat16)."""
    return info.act_dtype or torch.bfloat16


# --- kernels -------------------------------------------------------------------------------
class Reference(Kernel):
    """Any format, any device: packed storage, dequantize + ``F.linear`` at each call."""

    name = "reference"
    keeps_input_quantizer = True

    def supports(self, info: LayerInfo) -> bool:  # noqa: D102
        return True

    def build(self, layer, qt: QTensor, info: LayerInfo) -> None:  # noqa: D102
        for k, v in pack_weight(qt).items():
            layer.register_buffer(k, v)
        layer.spec = qt.spec

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if layer.input_quantizer is not None:
            x = layer.input_quantizer(x)
        w = dequantize_packed({"codes": layer.codes, "scale": layer.scale,
                               "zero_point": layer.zero_point,
                               "global_scale": layer.global_scale}, layer.spec,
                              (layer.out_features, layer.in_features), layer.compute_dtype)
        return F.linear(x, w.to(x.dtype))


INT8MM_K = 16  # torch._weight_int8pack_mm only for in_features multiple of this (see forward)
GEMM_ROWS = 32  # rows from which a weight-only layer dequantizes into a GEMM (when it can)


INT8_GEMV_PATH = "runtime.int8_gemv_native"


def int8_gemv_native(dtype: torch.dtype) -> bool:
    """Whether an int8 weight-only layer computing in ``dtype`` runs a decode row (one row)
    through lowbit's native int8 GEMV (``torch.ops.lowbit.int8_mm``,
    :func:`lowbit.runtime.native.int8_gemv_ready`); recorded in the hardware path report.

    Measured on SmolLM2-135M's decode (2-core AMD EPYC, weights streamed from memory every
    token): ~52 us a call against torch's kernel's ~85 us; on a small matrix repeated in the
    caches torch's kernel is as fast or faster (3072x576: 58 against 70 us), a case a model's
    decode does not have."""
    if dtype != torch.bfloat16:
        not_attempted(INT8_GEMV_PATH, f"activations in {dtype} (bfloat16 only)")
        return False
    return native.choose(INT8_GEMV_PATH, native.int8_gemv_ready, "torch's int8 kernel for "
                         "decode rows (slower decode, the same function)")


class Int8WeightOnly(Kernel):
    """int8 per-channel weights x bfloat16 activations: lowbit's native int8 GEMV for one
    row (decode) where it builds, ``torch._weight_int8pack_mm`` for a few rows, dequantize +
    GEMM from :data:`GEMM_ROWS` rows."""

    name = "int8_weight_only"
    devices = ("cpu",)

    def supports(self, info: LayerInfo) -> bool:  # noqa: D102
        return info.input is None and is_int(info.weight, 8) and \
            is_channel_weight(info.weight)

    def build(self, layer, qt: QTensor, info: LayerInfo) -> None:  # noqa: D102
        layer.act_dtype = act_dtype(info)
        layer.register_buffer("w_int8", qt.codes.contiguous().view(torch.int8))
        layer.register_buffer("w_scale", qt.scale.reshape(-1).to(layer.act_dtype).contiguous())
        layer.gemv_native = int8_gemv_native(layer.act_dtype)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.to(layer.act_dtype)
        if x.shape[0] == 1 and getattr(layer, "gemv_native", False):
            return torch.ops.lowbit.int8_mm(x, layer.w_int8, layer.w_scale)
        if x.shape[0] >= GEMM_ROWS or layer.act_dtype != torch.bfloat16 or \
                x.shape[-1] % INT8MM_K:
            # torch's int8 kernel is a GEMV: for prefill-sized batches (and outside
            # bfloat16, where it is not vectorized) dequantizing into a GEMM is 2-3x faster;
            # with in_features not a multiple of 16 it crashed (K=8, 2+ rows: segfault) or
            # returned wrong values (K=20, 1 row) on an AMD EPYC with torch 2.13
            return F.linear(x, layer.w_int8.to(x.dtype) * layer.w_scale[:, None])
        return torch._weight_int8pack_mm(x, layer.w_int8, layer.w_scale)


INT4_GROUPS = (32, 64, 128, 256)


def int4_scale_zeros(qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """``[G, out, 2]`` (scale, zero) per group, the layout of torch's int4 kernels, for
    ``w = (q_u - 8) * scale + zero`` with ``q_u = code + 8``."""
    scale = qt.scale.float()  # [out, G]
    zero = torch.zeros_like(scale) if qt.zero_point is None else \
        -qt.zero_point.float() * scale
    return torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous()


def int4_grouped(info: LayerInfo) -> bool:
    """int4 weights in groups of 32..256 along the input, no input quantizer."""
    w = info.weight
    return info.input is None and is_int(w, 4, symmetric=None) and \
        w.granularity == "group" and w.axis in (-1, 1) and w.group_size in INT4_GROUPS and \
        info.in_features % w.group_size == 0


INT4_GEMM_ROWS = 32  # rows from which an int4 layer dequantizes into the bf16 GEMM (measured crossover)
INT4_PREFILL_PATH = "runtime.int4_prefill_gemm"


def int4_prefill_gemm(out_features: int, dtype: torch.dtype) -> bool:
    """Whether an int4 weight-only layer of ``out_features`` computing in ``dtype`` can
    run prefill batches as native dequantization + bfloat16 GEMM (recorded in the hardware
    path report; a failure of the native helper warns once and keeps torch's kernel)."""
    if dtype != torch.bfloat16:
        not_attempted(INT4_PREFILL_PATH, f"activations in {dtype} (bfloat16 only)")
        return False
    try:
        bn = native.int4pack_ready()
    except native.NativeUnavailable as e:
        if "LOWBIT_NATIVE=0" in str(e):
            not_attempted(INT4_PREFILL_PATH, str(e))
        else:
            fell_back(INT4_PREFILL_PATH, e, "torch's int4 kernel for prefill batches too "
                      "(a GEMV per row: slower prefill, same results)")
        return False
    if out_features % bn:
        not_attempted(INT4_PREFILL_PATH, f"out_features {out_features} not a multiple of "
                      f"the packed block {bn}")
        return False
    return True


INT4_GEMV_PATH = "runtime.int4_gemv_native"


def int4_gemv_native(out_features: int, dtype: torch.dtype) -> bool:
    """Whether an int4 weight-only layer of ``out_features`` computing in ``dtype`` can run
    a decode row (one row) through lowbit's native int4 GEMV (``torch.ops.lowbit.int4_mm``,
    :func:`lowbit.runtime.native.int4_gemv_ready`); recorded in the hardware path report,
    and a failure of the native build or probe warns once and keeps torch's kernel."""
    if dtype != torch.bfloat16:
        not_attempted(INT4_GEMV_PATH, f"activations in {dtype} (bfloat16 only)")
        return False
    if out_features % 64:
        not_attempted(INT4_GEMV_PATH, f"out_features {out_features} not a multiple of 64")
        return False
    return native.choose(INT4_GEMV_PATH, native.int4_gemv_ready, "torch's int4 kernel for "
                         "decode rows (slower decode, the same function)")


class Int4WeightOnlyCPU(Kernel):
    """int4 grouped weights x bfloat16 activations: lowbit's native int4 GEMV for one row
    (decode) where it builds, torch's CPU int4 pack kernel for a few rows, native
    dequantization + bfloat16 GEMM from :data:`INT4_GEMM_ROWS` rows (prefill)."""

    name = "int4_weight_only"
    devices = ("cpu",)

    def supports(self, info: LayerInfo) -> bool:  # noqa: D102
        return int4_grouped(info) and info.out_features % 32 == 0

    def build(self, layer, qt: QTensor, info: LayerInfo) -> None:  # noqa: D102
        layer.act_dtype = act_dtype(info)
        q_u = (qt.element_format.code_to_int(qt.codes) + 8).to(torch.int32).contiguous()
        layer.register_buffer("w_packed", torch._convert_weight_to_int4pack_for_cpu(q_u, 1))
        layer.register_buffer("scale_zeros", int4_scale_zeros(qt, layer.act_dtype))
        layer.group_size = qt.spec.group_size
        layer.prefill_gemm = int4_prefill_gemm(info.out_features, layer.act_dtype)
        layer.gemv_native = int4_gemv_native(info.out_features, layer.act_dtype)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.to(layer.act_dtype)
        if x.shape[0] == 1 and getattr(layer, "gemv_native", False):
            return torch.ops.lowbit.int4_mm(x, layer.w_packed, layer.scale_zeros,
                                            layer.group_size)
        if x.shape[0] >= INT4_GEMM_ROWS and getattr(layer, "prefill_gemm", False):
            w_t = native.dequant_int4pack_t(layer.w_packed, layer.scale_zeros,
                                            layer.out_features, layer.in_features,
                                            layer.group_size)
            took_hardware(INT4_PREFILL_PATH)
            return torch.mm(x, w_t)
        return torch._weight_int4pack_mm_for_cpu(x, layer.w_packed, layer.group_size,
                                                 layer.scale_zeros)


W8A8_GEMV_ROWS = 16  # CPU: fewer rows than this take the int8 weight-only GEMV (decode)


class W8A8Int8(Kernel):
    """int8 weights and int8 activations: ``torch._int_mm`` (int32 accumulation) for
    prefill-sized batches, on CUDA, and with ``act_dtype=torch.float32``. On the CPU with
    the default ``act_dtype`` (bfloat16, as the weight-only kernels), decode-sized batches
    (fewer than :data:`W8A8_GEMV_ROWS` rows, ``in_features`` a multiple of 16) run the
    integer-valued activations through ``torch._weight_int8pack_mm`` (a GEMV, ~10x faster
    there than ``_int_mm``, which is a GEMM): the int8 x int8 products are exact in
    bfloat16 and summed in float32, the integer sum is rounded once to bfloat16 (2^-9
    relative), then both scales are applied in float32."""

    name = "w8a8_int8"
    devices = ("cpu", "cuda")

    def supports(self, info: LayerInfo) -> bool:  # noqa: D102
        if not (is_int(info.weight, 8) and is_channel_weight(info.weight) and
                is_int(info.input, 8) and plain_input(info)):
            return False
        if info.device.type == "cuda":  # cuBLASLt int8: K and N multiples of 8, at least 16
            return info.in_features % 8 == 0 and info.out_features % 8 == 0 and \
                min(info.in_features, info.out_features) >= 16
        return True

    def build(self, layer, qt: QTensor, info: LayerInfo) -> None:  # noqa: D102
        layer.register_buffer("w_int8", qt.codes.contiguous().view(torch.int8))  # [out, in]
        layer.register_buffer("w_scale", qt.scale.reshape(1, -1).float().contiguous())
        layer.register_buffer("act_amax", None if info.input_amax() is None else
                              info.input_amax().detach().float().clone())
        layer.act_spec = info.input
        gemv = info.device.type == "cpu" and info.in_features % INT8MM_K == 0 and \
            act_dtype(info) == torch.bfloat16
        layer.register_buffer("w_ones_bf16", torch.ones(info.out_features,
                                                        dtype=torch.bfloat16)
                              if gemv else None)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        cuda = x.is_cuda
        m = x.shape[0]
        if not cuda and m < W8A8_GEMV_ROWS and layer.w_ones_bf16 is not None:
            # a captured decode step (FastDecoder(compile=True)) checks its logits instead
            q, s = int_rows(x, layer.act_spec, layer.act_amax,
                            check_finite=not torch.compiler.is_compiling())
            acc = torch._weight_int8pack_mm(q.to(torch.bfloat16), layer.w_int8,
                                            layer.w_ones_bf16)
            return acc.float() * s * layer.w_scale
        qx = quantize(x, layer.act_spec, amax=layer.act_amax, check_finite=not cuda)
        xi = qx.codes.view(torch.int8)
        if cuda and m <= 16:  # cuBLASLt's _int_mm wants more than 16 rows (decode is 1 row)
            acc = torch._int_mm(F.pad(xi, (0, 0, 0, 17 - m)), layer.w_int8.t())[:m]
        else:
            acc = torch._int_mm(xi, layer.w_int8.t())
        return acc.float() * qx.scale.float() * layer.w_scale


for _k in (Reference(), Int8WeightOnly(), Int4WeightOnlyCPU(), W8A8Int8()):
    register_kernel(_k)
