"""``PackedLinear``: a linear layer whose weight stays as low-bit codes, computed by a kernel.

The kernels and how each is chosen are in :mod:`lowbit.runtime.kernels` (CPU, reference)
and :mod:`lowbit.runtime.cuda` (GPU); the reference storage in
:mod:`lowbit.runtime.storage`. Tolerances against the fake-quantized model (relative to the
largest output, float32 model):

* ``reference``: identical (``dequantize`` equals ``fake_quant`` bit for bit and the same
  ``F.linear`` runs);
* ``w8a8_int8``: ~1e-6 from the order of operations (scales after the integer dot product),
  but a 1-ulp difference upstream can move an activation by one int8 step, so whole models
  agree to ~1e-2;
* ``int8_weight_only``, ``int4_weight_only`` on the CPU: activations and scales in bfloat16
  (``act_dtype``; default): ~1e-2; with ``act_dtype=torch.float32``: ~1e-6 (but 20-100x
  slower);
* GPU kernels: bfloat16 activations or outputs: ~1e-2.

Kernel failures: a layer whose kernel was chosen automatically is built and run once on a
small random input (1 and 17 rows) at conversion; if the kernel raises there (a torch
without ``_convert_weight_to_int4pack_for_cpu``, a GPU that refuses ``_scaled_mm`` or
``_int_mm`` ...), the layer gets the ``reference`` kernel instead and a
:class:`~lowbit.hardware.HardwareFallbackWarning` with the error is issued once per kernel per
process. :func:`lowbit.hardware.hardware_path_report` records ``runtime.<kernel>`` as
``"hardware"`` or the fallback with its error. A kernel named explicitly is never replaced:
its failure is raised. The GPU kernels' tests (marked ``gpu``) ran once, on an NVIDIA H200
(torch 2.11, 2026-12-04); CI has no GPU.

The packed buffers keep their dtypes through ``module.to(dtype)``/``.half()`` (only device
moves apply to them), so a converted model can be cast without corrupting its codes.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import QTensor
from lowbit.errors import ConfigError
from lowbit.hardware import fell_back, took_hardware
from lowbit.runtime import cuda as _cuda  # noqa: F401  (registers the GPU kernels)
from lowbit.runtime.kernels import LayerInfo, check_act_dtype, get_kernel, select_kernel
from lowbit.runtime.storage import PackedBuffersMixin, packed_nbytes


class PackedLinear(PackedBuffersMixin, nn.Module):
    """``y = x W^T + b`` with ``W [out, in]`` stored packed for kernel ``kernel``.

    Build it with :meth:`from_qtensor` (or :func:`lowbit.runtime.convert`). ``packed_nbytes``
    is the size of the weight's codes and scales as quantized (see
    :func:`lowbit.runtime.storage.packed_nbytes`); ``compute_dtype`` the model's dtype.
    An online ``input_rotation`` (:mod:`lowbit.nn.rotation`; carried over from the
    quantized layer by :func:`lowbit.runtime.packed_module`) rotates the input before the
    kernel (and so before its input quantizer).
    """

    accepts_input_rotation = True

    def __init__(self, kernel: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.kernel = kernel
        self._impl = get_kernel(kernel)
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.input_quantizer = None
        self.packed_nbytes = 0
        self.spec = None

    # --- builders -----------------------------------------------------------------------------
    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32, kernel: str | None = None,
                     input_quantizer: nn.Module | None = None, device=None,
                     act_dtype: torch.dtype | None = None) -> "PackedLinear":
        """A packed layer for the 2-D ``[out, in]`` quantized weight ``qt``.

        ``kernel``: a registered kernel name, or None to pick the best one for ``device``
        (default: the device of ``qt.codes``; a chosen kernel that fails its first run falls
        back to ``reference`` with a warning, see the module doc); a kernel named here that
        does not support the layer is a ConfigError, one that fails raises.
        ``input_quantizer``: the layer's enabled input quantizer, applied as in the
        fake-quantized model (reference) or fused into the kernel (W8A8). ``dtype``: the
        model's dtype; ``act_dtype``: the dtype of the CPU weight-only kernels (bfloat16).
        """
        if len(qt.shape) != 2:
            raise ConfigError(f"PackedLinear needs a 2-D [out, in] weight; got shape "
                              f"{list(qt.shape)}")
        check_act_dtype(act_dtype)
        device = torch.device(device) if device is not None else qt.codes.device
        iq = input_quantizer if input_quantizer is not None and \
            getattr(input_quantizer, "is_enabled", True) else None
        info = LayerInfo(qt.spec, None if iq is None else iq.spec, iq, qt.shape[1],
                         qt.shape[0], device, dtype, act_dtype)
        name = kernel or select_kernel(info)
        impl = get_kernel(name)
        if kernel is not None and not impl.supports(info):
            raise ConfigError(f"kernel {kernel!r} does not support a {qt.spec.short()} weight "
                              f"of shape {list(qt.shape)} on {device}"
                              + (f" with {iq.spec.short()} inputs" if iq is not None else ""))
        if kernel is None and name != "reference":
            path = f"runtime.{name}"
            try:
                m = cls._build(name, qt, bias, dtype, iq, device, info)
                _probe(m)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the kernel's torch ops
                fell_back(path, e, "the reference kernel (dequantize + F.linear) for the "
                          "layers it fails on")
            else:
                took_hardware(path)
                return m
            name = "reference"
        return cls._build(name, qt, bias, dtype, iq, device, info)

    @classmethod
    def _build(cls, name: str, qt: QTensor, bias, dtype, iq, device: torch.device,
               info: LayerInfo) -> "PackedLinear":
        impl = get_kernel(name)
        m = cls(name, qt.shape[1], qt.shape[0], bias, dtype)
        with torch.no_grad():
            if impl.devices:  # a device kernel packs on its device
                impl.build(m, _to_device(qt, device), info)
            else:  # packing is portable: on the CPU (lowbit.formats' tables live there)
                impl.build(m, _to_device(qt, torch.device("cpu")), info)
        if impl.keeps_input_quantizer:
            m.input_quantizer = iq
        m.to(device)
        m.spec = qt.spec
        m.packed_nbytes = packed_nbytes(qt.spec, qt.shape)
        return m

    # legacy builders (one kernel each)
    @classmethod
    def int8_weight_only(cls, qt: QTensor, bias, dtype) -> "PackedLinear":
        """From a per-channel symmetric int8 QTensor of a ``[out, in]`` weight."""
        return cls.from_qtensor(qt, bias, dtype, "int8_weight_only")

    @classmethod
    def int4_weight_only(cls, qt: QTensor, bias, dtype) -> "PackedLinear":
        """From a grouped int4 QTensor (symmetric or affine) of a ``[out, in]`` weight."""
        return cls.from_qtensor(qt, bias, dtype, "int4_weight_only")

    @classmethod
    def reference(cls, qt: QTensor, bias, dtype, input_quantizer=None) -> "PackedLinear":
        """Any format: packed codes + scales, dequantized at each call."""
        return cls.from_qtensor(qt, bias, dtype, "reference", input_quantizer)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = (x R) W^T + b`` (``R``: the ``input_rotation``, when there is one): ``x [...,
        in]`` -> ``[..., out]`` in ``x``'s dtype."""
        rot = self._modules.get("input_rotation")
        if rot is not None:
            x = rot(x)
        # contiguous: the int4 kernel refuses strided rows (e.g. gpt-oss's gated expert input)
        y = self._impl.forward(self, x.reshape(-1, self.in_features).contiguous())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float ``[out, in]`` weight (reference kernel only; for checks and debugging)."""
        if self.kernel != "reference":
            raise ConfigError(f"dequantized_weight needs the reference kernel; this layer "
                              f"runs {self.kernel!r} (convert with fast=False)")
        from lowbit.runtime.storage import dequantize_packed

        return dequantize_packed({"codes": self.codes, "scale": self.scale,
                                  "zero_point": self.zero_point,
                                  "global_scale": self.global_scale}, self.spec,
                                 (self.out_features, self.in_features), self.compute_dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._impl = get_kernel(self.kernel)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kernel={self.kernel}"


PROBE_ROWS = (1, 17)  # a decode row, and a batch past the 16-row padding of _int_mm on CUDA


def _probe(m: PackedLinear) -> None:
    """Run ``m`` once per :data:`PROBE_ROWS` on a seeded random input (in its dtype, on its
    device): a kernel whose torch ops fail raises here, at conversion, not mid-generation."""
    dev = next((b.device for b in m.buffers() if b is not None), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in PROBE_ROWS:
            x = torch.randn(rows, m.in_features, generator=g).to(dev, m.compute_dtype)
            m(x)


def _to_device(qt: QTensor, device: torch.device) -> QTensor:
    if qt.codes.device == device:
        return qt

    def mv(t):
        return None if t is None else t.to(device)

    return QTensor(mv(qt.codes), mv(qt.scale), mv(qt.zero_point), qt.spec, qt.shape, qt.dtype,
                   mv(qt.global_scale))
