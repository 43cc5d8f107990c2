"""FP8 training recipe and per-tensor scaling state (amax history, delayed scaling).

Conventions (those of NVIDIA Transformer Engine):

* ``scale = FP8_MAX / (amax * 2**margin)`` multiplies a tensor into the FP8 range and
  ``scale_inv = 1 / scale = amax * 2**margin / FP8_MAX`` (computed that way, so with
  ``margin == 0`` it is exactly lowbit's per-tensor AbsMax scale ``amax / max``) maps codes
  back: ``x ~ fp8(x / scale_inv) * scale_inv``.
* **delayed** scaling quantizes a tensor with the scale derived from the amax history of the
  *previous* steps (``max`` over the window, or the ``most_recent`` entry), then records the
  tensor's own amax; values beyond the range saturate. The very first step, with an empty
  history, uses the current amax.
* **current** scaling derives the scale from the tensor's own amax at every step (the amax
  is still recorded, for monitoring).
* formats: ``"hybrid"``: E4M3 for activations and weights (forward), E5M2 for gradients
  (backward); ``"e4m3"``: E4M3 everywhere.
"""

from __future__ import annotations

import difflib

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from lowbit import formats
from lowbit.core import QuantSpec
from lowbit.errors import ConfigError

FP8_FORMATS = {"hybrid": ("fp8_e4m3", "fp8_e5m2"), "e4m3": ("fp8_e4m3", "fp8_e4m3")}


class Fp8Recipe(BaseModel):
    """How FP8 training scales and rounds (immutable; build with keywords or :meth:`parse`).

    ``format``: ``"hybrid"`` or ``"e4m3"``; ``scaling``: ``"delayed"`` or ``"current"``;
    ``amax_history_len``: steps kept per tensor (default 1024); ``amax_compute_algo``:
    ``"max"`` over the history or ``"most_recent"``; ``margin``: extra headroom as a power of
    two (``scale`` is divided by ``2**margin``); ``exclude``: module-name patterns left in
    high precision (default the LM head); ``use_scaled_mm``: on CUDA, run the GEMMs with
    ``torch._scaled_mm`` where the shapes allow (otherwise the float32 emulation).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["hybrid", "e4m3"] = "hybrid"
    scaling: Literal["delayed", "current"] = "delayed"
    amax_history_len: int = Field(1024, ge=1)
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = Field(0, ge=0, le=64)
    exclude: list[str] = ["*lm_head"]
    use_scaled_mm: bool = True

    @classmethod
    def parse(cls, data: "Fp8Recipe | dict | None" = None, **overrides) -> "Fp8Recipe":
        """A recipe from None (defaults), a dict or a recipe, with keyword overrides; bad
        values raise a one-line :class:`~lowbit.errors.ConfigError` naming the field."""
        if isinstance(data, Fp8Recipe) and not overrides:
            return data
        d = data.model_dump() if isinstance(data, Fp8Recipe) else dict(data or {})
        d.update(overrides)
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(loc, list(cls.model_fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                msg = (f"unknown key {loc!r}{hint}; expected one of: "
                       f"{', '.join(cls.model_fields)}")
            elif loc:
                msg = f"{loc}: {msg}"
            raise ConfigError(f"fp8 recipe: {msg}") from None

    @property
    def forward_format(self) -> str:
        """Element format of activations and weights."""
        return FP8_FORMATS[self.format][0]

    @property
    def backward_format(self) -> str:
        """Element format of gradients."""
        return FP8_FORMATS[self.format][1]


def fp8_spec(fmt: str) -> QuantSpec:
    """The per-tensor spec of FP8 format ``fmt`` (``"fp8_e4m3"`` or ``"fp8_e5m2"``)."""
    return QuantSpec(format=fmt, granularity="tensor")


class AmaxHistory(nn.Module):
    """Scaling state of one tensor: a ring buffer of its last ``length`` amax values and
    the scale derived from it.

    Buffers (in ``state_dict``): ``history`` float32 ``[length]`` (0 = empty slot),
    ``scale`` and ``scale_inv`` float32 ``[]``, ``steps`` int64 ``[]`` (amax values recorded
    so far; the next one goes to ``history[steps % length]``).
    """

    def __init__(self, fmt: str, length: int = 1024, margin: int = 0,
                 algo: str = "max"):
        super().__init__()
        if length < 1:
            raise ConfigError(f"amax history length must be at least 1, got {length}")
        self.fmt = fmt
        self.fp8_max = formats.get(fmt).max
        self.margin = margin
        self.algo = algo
        self.register_buffer("history", torch.zeros(length))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("scale_inv", torch.ones(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def initialized(self) -> bool:
        """Whether at least one amax was recorded (delayed scaling has a scale to use)."""
        return int(self.steps) > 0

    def scale_inv_for(self, amax: torch.Tensor) -> torch.Tensor:
        """``amax * 2**margin / FP8_MAX`` (float32 ``[]``); 1 when amax is 0 or not finite."""
        a = torch.as_tensor(amax, dtype=torch.float32).reshape(())
        ok = torch.isfinite(a) & (a > 0)
        s = a * (2.0 ** self.margin) / self.fp8_max
        return torch.where(ok, s, torch.ones_like(s))

    def scale_inv_to_use(self, amax: torch.Tensor, scaling: str) -> torch.Tensor:
        """The ``scale_inv`` (float32 ``[]``) to quantize a tensor whose amax is ``amax``:
        its own (``"current"``, or ``"delayed"`` with an empty history) or the one derived
        from the history of previous steps (``"delayed"``). Does not record ``amax``."""
        now = self.scale_inv_for(amax)
        if scaling == "current":
            return now
        return torch.where(self.steps > 0, self.scale_inv, now)

    @torch.no_grad()
    def record(self, amax: torch.Tensor) -> None:
        """Store one amax (float32 ``[]``, the max ``|x|`` of a tensor) in the ring buffer
        (overwriting the oldest once full) and update ``scale``/``scale_inv`` from the
        history (see the module doc). A non-finite amax is stored as 0; an all-zero history
        keeps the previous scale. No host synchronisation."""
        a = torch.as_tensor(amax, dtype=torch.float32).reshape(1).to(self.history.device)
        a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
        i = (self.steps % self.history.numel()).reshape(1)
        self.history.index_copy_(0, i, a)
        self.steps += 1
        h = self.history.max() if self.algo == "max" else self.history[i].reshape(())
        ok = h > 0
        self.scale_inv.copy_(torch.where(ok, self.scale_inv_for(h), self.scale_inv))
        hm = (h * 2.0 ** self.margin).clamp_min(torch.finfo(torch.float32).tiny)
        self.scale.copy_(torch.where(ok, self.fp8_max / hm, self.scale))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the statistics: they stay float32
        keep = {k: self._buffers[k] for k in ("history", "scale", "scale_inv")}
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new.dtype != torch.float32:
                self._buffers[k] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"{self.fmt}, length={self.history.numel()}, margin={self.margin}, "
                f"algo={self.algo}")


class Fp8Meta(nn.Module):
    """The three scaling states of one FP8 linear layer: ``input``, ``weight`` (forward
    format) and ``grad_output`` (backward format)."""

    def __init__(self, recipe: Fp8Recipe):
        super().__init__()
        kw = dict(length=recipe.amax_history_len, margin=recipe.margin,
                  algo=recipe.amax_compute_algo)
        self.input = AmaxHistory(recipe.forward_format, **kw)
        self.weight = AmaxHistory(recipe.forward_format, **kw)
        self.grad_output = AmaxHistory(recipe.backward_format, **kw)
