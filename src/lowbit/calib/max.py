"""The ``max`` calibrator: running max |x| per unit (running min/max x for affine specs)."""

from __future__ import annotations

from lowbit.calib.base import Calibrator, register_calibrator


@register_calibrator("max")
class MaxCalibrator(Calibrator):
    """amax = the largest |x| observed per unit (no clipping).

    * symmetric specs: ``{"amax": max |x|}``;
    * affine specs (``symmetric=False``): ``{"amax": max x, "amin": min x}``;
    * ``nvfp4``: the per-tensor amax (shape ``[]``) that sets its global scale.

    Cost per batch: one ``aminmax`` pass over ``x``; state: 3 floats per unit. No options.
    """

    supports_block_formats = True

    def _compute(self):
        if self.spec.symmetric:
            return self.amax, None
        return self.max, self.min
