"""``TensorQuantizer``: one spec, its calibrated statistics and a mode.

Modes:

* ``disabled``: the input passes through unchanged;
* ``calibrating``: the input passes through unchanged and a calibrator observes it
  (static quantizers only; dynamic ones compute their scales from each input);
* ``quantizing``: the input is fake-quantized (``lowbit.core.fake_quant``) with the
  calibrated ``amax`` (static) or scales computed from the input itself (dynamic, and
  weights, whose statistics are the weight itself).

Calibrated statistics live in buffers ``amax`` (and ``amin`` for affine specs), so they are
part of ``state_dict()``. Per-channel activation statistics are stored flat ``[C]``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import QuantSpec, fake_quant, search_scales
from lowbit.errors import CalibrationError

MODES = ("disabled", "calibrating", "quantizing")


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor per ``spec`` (``None``: a disabled placeholder)."""

    def __init__(self, spec: QuantSpec | None = None, role: str = "input", name: str = ""):
        super().__init__()
        self.spec = spec
        self.role = role
        self.qname = name
        self.mode = "quantizing" if spec is not None else "disabled"
        self.register_buffer("amax", None)
        self.register_buffer("amin", None)
        # fixed scales (stored layout), set by GPTQ/AWQ or a loaded checkpoint: when present,
        # they are used instead of scales computed from the input
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("global_scale", None)
        self.calibrator = None
        self._ggml_cache = None  # (weight key, scale, zero_point, global_scale)
        self.note = ""  # e.g. "group 128 -> 96 (576 % 128 != 0)"

    # --- state -----------------------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        """True when this quantizer changes its input (a spec, not disabled)."""
        return self.spec is not None and self.mode != "disabled"

    @property
    def needs_calibration(self) -> bool:
        """Static activation quantizers need calibration data; weights and dynamic ones don't."""
        return self.spec is not None and self.role != "weight" and not self.spec.dynamic and \
            not (self.spec.block_format is not None and not self.spec.block_format.global_scale)

    def disable(self) -> None:
        """Pass inputs through unchanged."""
        self.mode = "disabled"

    def enable(self) -> None:
        """Quantize again (after :meth:`disable`)."""
        if self.spec is not None:
            self.mode = "quantizing"

    def start_calibration(self) -> None:
        """Observe inputs (and pass them through) until :meth:`finish_calibration`."""
        if not self.needs_calibration:
            return
        from lowbit.calib import get_calibrator

        self.calibrator = get_calibrator(self.spec.calibrator, self.spec,
                                         **self.spec.calibrator_args)
        self.mode = "calibrating"

    def finish_calibration(self) -> None:
        """Turn the calibrator's statistics into ``amax``/``amin`` and start quantizing."""
        if self.mode != "calibrating":
            return
        try:
            stats = self.calibrator.compute()
        except CalibrationError as e:
            raise CalibrationError(f"quantizer {self.qname or self.role}: {e}") from None
        self.set_amax(stats["amax"], stats.get("amin"))
        self.calibrator = None
        self.mode = "quantizing"

    def set_amax(self, amax: torch.Tensor, amin: torch.Tensor | None = None) -> None:
        """Set static statistics (per-channel ones are stored flat)."""
        def norm(t):
            t = torch.as_tensor(t, dtype=torch.float32).detach().clone()
            return t.reshape(-1) if self.spec.granularity == "channel" else t
        self.amax = norm(amax)
        self.amin = norm(amin) if amin is not None else None

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize, observe or pass ``x`` through, per the mode."""
        if self.spec is None or self.mode == "disabled":
            return x
        if self.mode == "calibrating":
            with torch.no_grad():
                self.calibrator.observe(x.detach())
            return x
        if self.needs_calibration and self.amax is None:
            raise CalibrationError(
                f"quantizer {self.qname or self.role} ({self.spec.short()}) is static but was "
                "never calibrated; pass forward_loop or calib_data to lowbit.quantize"
            )
        spec = self.spec
        if spec.granularity == "channel" and self.role != "weight":
            spec = spec.model_copy(update={"axis": self._channel_axis(x)})
        if self.scale is not None:
            return fake_quant(x, spec, scale=self.scale, zero_point=self.zero_point,
                              global_scale=self.global_scale)
        if spec.ggml_type is not None and self.role == "weight":
            s, zp, gs = self._ggml_scales(x)
            return fake_quant(x, spec, scale=s, zero_point=zp, global_scale=gs)
        amax = None if (spec.dynamic or self.role == "weight") else self.amax
        amin = None if amax is None else self.amin
        return fake_quant(x, spec, amax=amax, amin=amin)

    def _ggml_scales(self, w: torch.Tensor):
        """Searched scales of weight ``w`` for a ggml spec, cached until ``w`` changes (the
        search costs far more than rounding; an in-place update bumps ``w._version``)."""
        key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device, self.spec.format)
        if self._ggml_cache is None or self._ggml_cache[0] != key:
            with torch.no_grad():
                w2 = w.detach().reshape(-1, w.shape[-1])
                self._ggml_cache = (key, *search_scales(w2, self.spec.ggml_type))
        return self._ggml_cache[1:]

    def set_fixed_scale(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                        global_scale: torch.Tensor | None = None) -> None:
        """Fix the scales (stored layout of :mod:`lowbit.core.layout`) of this quantizer."""
        self.scale = scale.detach().float().clone()
        self.zero_point = None if zero_point is None else zero_point.detach().clone()
        self.global_scale = None if global_scale is None else \
            torch.as_tensor(global_scale, dtype=torch.float32).detach().clone()

    def _channel_axis(self, x: torch.Tensor) -> int:
        axis = self.spec.axis if self.spec.axis is not None else -1
        return axis % x.ndim if x.ndim else 0

    def extra_repr(self) -> str:
        if self.spec is None:
            return "disabled"
        s = f"{self.spec.short()}, mode={self.mode}"
        if self.amax is not None:
            s += f", amax={float(self.amax.max()):.4g}"
        return s
