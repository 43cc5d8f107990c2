"""The ``max`` calibrator: running max |x| (and min/max for affine specs)."""

from __future__ import annotations

import torch

from lowbit.calib.base import Calibrator, register_calibrator


@register_calibrator("max")
class MaxCalibrator(Calibrator):
    """amax = the largest |x| observed per unit; affine specs also track min and max."""

    supports_asymmetric = True

    def reset(self) -> None:
        super().reset()
        self.amax = self.lo = self.hi = None

    def observe(self, x: torch.Tensor) -> None:
        rows = self._rows(x)
        if rows.numel() == 0:
            return
        lo, hi = rows.aminmax(dim=1)
        a = torch.maximum(hi.abs(), lo.abs())
        if self.amax is None:
            self.amax, self.lo, self.hi = a, lo, hi
        else:
            self.amax = torch.maximum(self.amax, a)
            self.lo = torch.minimum(self.lo, lo)
            self.hi = torch.maximum(self.hi, hi)
        self.n_batches += 1

    def compute(self) -> dict[str, torch.Tensor]:
        self._need_data()
        if self.spec.symmetric:
            return {"amax": self._shape_out(self.amax)}
        return {"amax": self._shape_out(self.hi), "amin": self._shape_out(self.lo)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._need_data()
        return {"amax": self.amax, "lo": self.lo, "hi": self.hi,
                "n": torch.tensor(self.n_batches)}

    def load_state_dict(self, state) -> None:
        self.amax, self.lo, self.hi = state["amax"], state["lo"], state["hi"]
        self.n_batches = int(state["n"])

    def merge_states(self, states) -> None:
        self.amax = torch.stack([s["amax"] for s in states]).amax(0)
        self.lo = torch.stack([s["lo"] for s in states]).amin(0)
        self.hi = torch.stack([s["hi"] for s in states]).amax(0)
        self.n_batches = sum(int(s["n"]) for s in states)
