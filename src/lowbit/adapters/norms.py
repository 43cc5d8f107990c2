"""How a norm scales its normalised input: ``w`` or ``1 + w``, found by running it.

Folding a per-channel scale ``s`` into a norm (SmoothQuant, AWQ) divides its output by ``s``.
For ``y = n(x) * w (+ b)`` (Llama's RMSNorm, LayerNorm) that is ``w / s`` (and ``b / s``);
for ``y = n(x) * (1 + w) (+ b)`` (Gemma, Qwen3-Next) it is ``(1 + w) / s - 1``. Which one
a module computes is measured, never guessed from its class name: :func:`norm_kind` runs it
on a known input (or its captured one) with its weight set to zeros, to ones and to a
random vector (and its bias to zeros, then to a random vector), and checks that the output
is ``n * (offset + w) + b`` per channel with ``offset`` 0 or 1. Anything else is refused
with a :class:`~lowbit.errors.ConfigError` naming the module and its class.

The probe costs three or four calls of the norm on a ``[1, 5, C]`` input (its real input
only when it needs more than ``x``, as a gated RMSNorm does), so nothing is cached: a class
whose behaviour depends on its configuration is measured each time.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.errors import ConfigError

NORM_KINDS = {"w": 0.0, "1+w": 1.0}
"""Norm kind -> the offset added to the weight before it multiplies the normalised input."""


def probe_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the norm probe for outputs in ``dtype`` (the two kinds differ
    by 100%: the tolerance only absorbs rounding)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _label(norm: nn.Module, name: str | None) -> str:
    return f"norm {name or '(unnamed)'} ({type(norm).__name__})"


class _CannotRun(Exception):
    """The norm failed on the probe input (the exception is the cause)."""


def _responses(norm: nn.Module, label: str, args: tuple, kwargs: dict, r: torch.Tensor):
    """The norm's outputs (float32) with weight 0, 1, ``r`` (bias 0) and weight 0, bias
    ``r``; the weight and bias are restored. Also ``r`` as the weight and bias hold it."""
    w, b = norm.weight, getattr(norm, "bias", None)
    c = w.numel()
    saved_w = w.detach().clone()
    saved_b = b.detach().clone() if b is not None else None

    def run(wv, bv=None):
        w.copy_(wv)
        if b is not None:
            b.copy_(torch.zeros_like(b) if bv is None else bv)
        try:
            y = _first(norm(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - any failure of a foreign module is reported
            raise _CannotRun() from e
        if not torch.is_tensor(y) or y.dim() == 0 or y.shape[-1] != c:
            shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ConfigError(f"{label}: its output {shape} does not end with its weight's "
                              f"{c} channels: per-channel scales cannot be folded into it")
        return y.float()

    try:
        y0 = run(torch.zeros_like(w))
        y1 = run(torch.ones_like(w))
        yr = run(r)
        r_w = w.float().clone()  # r as the weight's dtype holds it
        yb = run(torch.zeros_like(w), r) if b is not None else None
        r_b = b.float().clone() if b is not None else None
    finally:
        w.copy_(saved_w)
        if b is not None:
            b.copy_(saved_b)
    return y0, y1, yr, r_w, yb, r_b


@torch.no_grad()
def norm_kind(norm: nn.Module,
              inputs: "tuple[tuple, dict] | Callable[[], tuple[tuple, dict]] | None" = None,
              name: str | None = None) -> str:
    """``"w"`` or ``"1+w"``: how ``norm`` scales its normalised input, by behaviour.

    The norm runs on a seeded ``[1, 5, C]`` input in its weight's dtype, or on ``inputs``
    ``(args, kwargs)`` when given as such. ``inputs`` may also be a callable returning
    them (e.g. capturing the norm's real inputs): it is called only when the module cannot
    run on the probe input alone (a gated RMSNorm needs its gate). ``name``: the module's
    name, for errors. The weight (and bias) are restored.

    Raises :class:`ConfigError` when the module has no per-channel weight ``[C]``, cannot
    be run, or whose output is not ``n * (offset + w) + b`` per channel with ``offset`` 0
    or 1.
    """
    label = _label(norm, name)
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise ConfigError(f"{label} has no per-channel weight [C]: per-channel scales "
                          "cannot be folded into it")
    c = w.numel()
    b = getattr(norm, "bias", None)
    if b is not None and (not isinstance(b, torch.Tensor) or b.shape != w.shape):
        raise ConfigError(f"{label}: bias of shape {tuple(getattr(b, 'shape', ()))} does not "
                          f"match its weight [{c}]: per-channel scales cannot be folded into it")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, c, generator=g).to(w.device, w.dtype)
    r = (torch.rand(c, generator=g) + 0.5).to(w.device)
    tries = [inputs] if isinstance(inputs, tuple) else \
        [((x,), {})] + ([inputs] if inputs is not None else [])
    for i, got in enumerate(tries):
        try:
            args, kwargs = got() if callable(got) else got
            y0, y1, yr, r_w, yb, r_b = _responses(norm, label, args, kwargs, r)
            break
        except _CannotRun as e:
            if i + 1 == len(tries):
                cause = e.__cause__
                raise ConfigError(f"{label} could not be run on a probe input to tell whether "
                                  f"it scales by w or 1+w ({type(cause).__name__}: {cause})") \
                    from None
    n = y1 - y0
    unit = float(n.norm())
    tol = probe_tolerance(w.dtype)
    if not unit > 0 or not torch.isfinite(n).all():
        raise ConfigError(f"{label}: its output does not depend on its weight (or is not "
                          "finite): per-channel scales cannot be folded into it")

    def close(a, ref) -> bool:
        return float((a - ref).norm()) <= tol * unit

    if not close(yr, y0 + n * r_w):
        raise ConfigError(f"{label}: its output is not n(x) * (offset + w) per channel: "
                          "per-channel scales cannot be folded into it")
    if close(y0, torch.zeros_like(y0)):
        kind = "w"
    elif close(y0, n):
        kind = "1+w"
    else:
        off = float((y0 * n).sum() / n.square().sum())
        raise ConfigError(f"{label} scales its normalised input by w + {off:.3g}, not by w or "
                          "1+w: per-channel scales cannot be folded into it")
    if yb is not None and not close(yb - y0, r_b.expand_as(yb)):
        raise ConfigError(f"{label}: its bias is not added per channel after the weight: "
                          "per-channel scales cannot be folded into it")
    return kind


def norm_offset(norm: nn.Module, inputs: tuple[tuple, dict] | None = None,
                name: str | None = None) -> float:
    """0.0 for a norm that scales by ``w``, 1.0 for ``1 + w`` (:func:`norm_kind`)."""
    return NORM_KINDS[norm_kind(norm, inputs, name)]
