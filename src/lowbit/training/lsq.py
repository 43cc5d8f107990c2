"""Fake quantization with a learnable scale (LSQ): the forward pass is ``lowbit.core``'s.

``learnable_fake_quant(x, spec, scale=s)`` (weights: the scale in its stored layout is the
parameter) or ``learnable_fake_quant(x, spec, amax=a)`` (static activations: the calibrated
range is the parameter) returns exactly ``lowbit.core.fake_quant`` of the same arguments:
the rounding is core's, this module only adds gradients.

Gradients (straight-through estimator on the rounding only, as in LSQ, Esser et al. 2020):
with ``u = x / s (+ zero_point)``, ``y = s * (Q(u) - zero_point)`` and ``inside`` the mask
``qmin <= u <= qmax`` (for float formats ``-max <= u <= max``):

* ``dy/dx = inside`` (the usual STE of ``fake_quant``);
* ``dy/ds = (y - inside * x) / s``, i.e. ``Q(u) - zp - u`` inside the range and
  ``Q(u) - zp`` (the clipped code) outside; summed over the elements of each scale unit;
* for an ``amax`` parameter ``s = amax / d`` (``d`` the format's divisor, e.g. 448 for
  e4m3 or 7.5 for int4), so ``dy/damax = (dy/ds) * s / amax``.

A scale stored in a narrower format (``scale_format`` fp16/bf16/e4m3/e8m0) is rounded to it
by core in the forward pass and passed straight through in the backward pass. A parameter
that goes non-positive is treated as the smallest positive float32 (the scale of an all-zero
unit is 1, as in core).
"""

from __future__ import annotations

import torch

from lowbit.core import QuantSpec, compute_scales, fake_quant
from lowbit.core.quant import round_scale
from lowbit.errors import ConfigError

_TINY = torch.finfo(torch.float32).tiny


def effective_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale core will use for a learnable ``scale`` parameter: positive, rounded to
    ``spec.scale_format`` (float32, same shape as ``scale``, no gradient)."""
    return round_scale(scale.detach().float().clamp_min(_TINY), spec.scale_format)


def check_learnable(spec: QuantSpec, kind: str, where: str = "quantizer") -> None:
    """Raise ConfigError when a learnable ``kind`` ("scale" or "amax") cannot apply to
    ``spec`` (block-scaled formats; asymmetric activation ranges)."""
    if spec.block_format is not None:
        raise ConfigError(f"{where}: learnable scales are not supported for the block-scaled "
                          f"format {spec.format}; use scales='frozen'")
    if kind == "amax" and not spec.symmetric:
        raise ConfigError(f"{where}: a learnable activation range needs a symmetric spec "
                          f"(got {spec.short()}); use scales='frozen'")
    if kind == "amax" and spec.dynamic:
        raise ConfigError(f"{where}: dynamic quantizers compute their scale per input; there "
                          "is no range to learn")


class _LearnableFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, spec, kind, zero_point):  # noqa: D102
        xd = x.detach()
        if kind == "scale":
            s_eff = effective_scale(p, spec)
            y = fake_quant(xd, spec, scale=s_eff, zero_point=zero_point, check_finite=False)
        else:
            y = fake_quant(xd, spec, amax=p.detach(), check_finite=False)
        ctx.spec, ctx.kind = spec, kind
        ctx.save_for_backward(xd, p.detach(), y, zero_point)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        x, p, y, zero_point = ctx.saved_tensors
        spec, kind = ctx.spec, ctx.kind
        if kind == "scale":
            lay, xv, s, zp, _ = compute_scales(x, spec, scale=effective_scale(p, spec),
                                               zero_point=zero_point, check_finite=False)
        else:
            lay, xv, s, zp, _ = compute_scales(x, spec, amax=p, check_finite=False)
        fmt = spec.element_format
        u = xv / s
        if zp is not None:
            u = u + zp
        inside = ((u >= fmt.min) & (u <= fmt.max)).float()
        gv = lay.view(g.float())
        grad_x = lay.unview(gv * inside).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_p = None
        if ctx.needs_input_grad[1]:
            yv = lay.view(y.float())
            ge = gv * (yv - inside * xv) / s
            dims = lay.reduce_dims
            gs = ge.sum(dim=dims, keepdim=True) if dims else ge.sum().reshape([1] * ge.ndim)
            if kind == "amax":
                a = lay.from_natural(p)
                gs = torch.where(a > 0, gs * s / a.clamp_min(_TINY), torch.zeros_like(gs))
            else:
                gs = torch.where(lay.from_natural(p) > 0, gs, torch.zeros_like(gs))
            grad_p = lay.to_natural(gs).reshape(p.shape).to(p.dtype)
        return grad_x, grad_p, None, None, None


def learnable_fake_quant(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                         amax: torch.Tensor | None = None,
                         zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` (any shape; float16/bfloat16/float32/float64) with a learnable
    ``scale`` (stored layout of :mod:`lowbit.core.layout`, e.g. ``[out, in / group]``) or a
    learnable ``amax`` (stored layout; per-channel ranges may be flat ``[C]``).

    Exactly one of ``scale`` and ``amax`` is given. ``zero_point`` (affine weights, stored
    layout) stays fixed. Returns ``lowbit.core.fake_quant(x, spec, ...)`` bit for bit (same
    shape and dtype as ``x``), differentiable w.r.t. ``x`` and the parameter (see the module
    doc for the gradients).
    """
    if (scale is None) == (amax is None):
        raise ConfigError("learnable_fake_quant: pass exactly one of scale= and amax=")
    kind = "scale" if scale is not None else "amax"
    check_learnable(spec, kind, "learnable_fake_quant")
    p = scale if scale is not None else amax
    return _LearnableFakeQuant.apply(x, p, spec, kind, zero_point)
