"""The calibrator interface and registry.

A calibrator watches the tensors a static quantizer will see (``observe``) and turns what
it saw into the quantizer's statistics (``compute``): ``{"amax": ...}`` (plus ``"amin"``
for affine specs) in the stored layout of :mod:`lowbit.core.layout` — shape ``[]`` per
tensor, ``[C]`` (flat) per channel, where the channel axis is ``spec.axis`` of the observed
tensor (``-1``, the hidden dimension, for the inputs of a linear layer).

Distributed calibration: every calibrator's ``state_dict()`` is a dict of tensors that
``merge_states([...])`` combines (max of maxima, sums of histograms over a common range), so
an all-gather of the states followed by a merge equals a single process that observed all
the data.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.core import QuantSpec
from lowbit.errors import CalibrationError, ConfigError


class Calibrator:
    """Base class: per-tensor or per-channel statistics of observed tensors."""

    name = "base"
    supports_asymmetric = False

    def __init__(self, spec: QuantSpec, **kwargs):
        self.spec = spec
        g = spec.granularity
        bf = spec.block_format
        self.per_tensor = g == "tensor" or (bf is not None and bf.global_scale)
        if not self.per_tensor and g != "channel":
            raise ConfigError(
                f"calibrator {self.name!r}: calibration applies to tensor and channel "
                f"granularities; {spec.short()} computes its scales from the data at run time"
            )
        if not spec.symmetric and not self.supports_asymmetric:
            raise ConfigError(f"calibrator {self.name!r} supports symmetric specs only; use "
                              "'max' for asymmetric activations")
        if kwargs:
            raise ConfigError(f"calibrator {self.name!r}: unknown option(s) "
                              f"{sorted(kwargs)}")
        self.reset()

    def reset(self) -> None:
        """Forget everything observed."""
        self.n_batches = 0

    # --- helpers ---------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 ``[units, values]``: one row per scale unit (1 or C rows)."""
        x = x.detach().float()
        if self.per_tensor:
            return x.reshape(1, -1)
        axis = self.spec.axis if self.spec.axis is not None else -1
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)

    def _shape_out(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.per_tensor else t.reshape(-1)

    def _need_data(self) -> None:
        if self.n_batches == 0:
            raise CalibrationError(f"calibrator {self.name!r} saw no data: the forward loop "
                                   "never reached this quantizer")

    # --- interface -------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of ``x`` (any float dtype and shape)."""
        raise NotImplementedError

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"amax": tensor}`` (``"amin"`` too for affine specs), stored layout."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The statistics as tensors (for saving or an all-gather)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the statistics by ``state``."""
        raise NotImplementedError

    def merge_states(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Set this calibrator's statistics to the combination of ``states``."""
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., Calibrator]] = {}


def register_calibrator(name: str):
    """Class decorator: register a Calibrator subclass under ``name``."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def calibrator_names() -> list[str]:
    """Names of the registered calibrators."""
    return list(_REGISTRY)


def get_calibrator(name: str, spec: QuantSpec, **kwargs) -> Calibrator:
    """A new calibrator ``name`` for ``spec`` (ConfigError naming the choices if unknown)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown calibrator {name!r}; expected one of: "
                          f"{', '.join(_REGISTRY)}")
    return _REGISTRY[name](spec, **kwargs)
