"""AWQ (Lin et al. 2024): activation-aware per-channel weight scales, then clipping.

Scale search, per group of linears reading one input ``X``: ``s = mean|X|^alpha`` normalised
by ``sqrt(max(s) min(s))``, ``alpha`` on a grid of 20 points in ``[0, 1)``, keeping the ``s``
that minimises the output error of the group's target module with the group's weights
``Q(W diag(s))`` reading ``X diag(s)^-1`` (:class:`~lowbit.algorithms.smoothing.GroupProbe`);
``s`` is folded into the preceding norm or linear. With ``duo_scaling``, ``s = mean|X|^alpha /
mean|W|^(1-alpha)`` (``mean|W|`` of the group-normalised weights, as AutoAWQ's later
versions).

Clipping search, per linear: each quantization group's range is shrunk by ratios from 1
down to ``min_ratio``; the ratio minimising ``||(Q(W_g) - W_g) X_g||^2`` on a token sample
is kept per group, and the resulting scales become the weight quantizer's fixed scales
(``set_fixed_scale``). Every format whose scales follow a range works: integer groups
(symmetric and affine), NVFP4 (block scales under the tensor's global scale), MXFP4/6/8
(power-of-two shared exponents), per-channel specs (one group per row). The GGUF block
types (``gguf_*``) are not clipped: their scales and mins come from an importance-weighted
search (:mod:`lowbit.core.ggml`; the ``imatrix`` step after ``awq`` runs it with the
scaled weights' calibration inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.algorithms.smoothing import (GroupProbe, fold_scales, search_grid, weight_2d,
                                         weight_spec)
from lowbit.core import fake_quant, quantize


def awq_scales(xmean: torch.Tensor, alpha: float, wmean: torch.Tensor | None = None) \
        -> torch.Tensor:
    """``mean|X|^alpha`` (``/ mean|W|^(1-alpha)`` with ``wmean``), normalised by
    ``sqrt(max * min)``; ``[in]``."""
    s = xmean.float().clamp_min(1e-8).pow(alpha)
    if wmean is not None:
        s = s / wmean.float().clamp_min(1e-8).pow(1 - alpha)
    s = s.clamp_min(1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return s


def group_weight_mean(block, group) -> torch.Tensor:
    """Mean over the group's rows of ``|W|`` normalised per quantization group (or row):
    AutoAWQ's ``w_mean`` for duo scaling; ``[in]``."""
    rows = []
    for n in group.linears:
        m = block.get_submodule(n)
        w = weight_2d(m).detach().float()
        spec = weight_spec(m)
        g = spec.group_size if spec is not None and spec.granularity == "group" else w.shape[1]
        wg = w.abs().reshape(w.shape[0], -1, g)
        wg = wg / wg.amax(-1, keepdim=True).clamp_min(1e-8)
        rows.append(wg.reshape(w.shape))
    return torch.cat(rows).mean(0)


@torch.no_grad()
def awq_search(block, group, probe: GroupProbe, xmean: torch.Tensor, grid: int = 20,
               duo_scaling: bool = False, fold: bool = True, refine: bool = False) \
        -> tuple[float | None, torch.Tensor | None, dict]:
    """Search and (``fold``) apply the AWQ scales of one group.

    Returns ``(alpha, s, losses)``; ``alpha`` is None (and nothing is folded) when no
    candidate beats the unscaled weights. ``fold`` uses
    :func:`~lowbit.algorithms.smoothing.fold_scales` (the norm's kind is measured, the
    block's function is not checked); the pipeline passes ``fold=False`` and folds through
    ``BlockContext.fold``, which checks it.
    """
    # grouped-query v_proj -> o_proj: channels sharing a value channel share one scale
    wmean = group.tie(group_weight_mean(block, group), "mean") if duo_scaling else None
    xmean = group.tie(xmean.float(), "mean")
    losses = {None: probe.loss(None)}
    losses.update(search_grid([i / grid for i in range(grid)],
                              lambda a: probe.loss(awq_scales(xmean, a, wmean)), refine))
    best = None  # the first strictly better candidate in alpha order, as a plain scan
    for a in sorted(x for x in losses if x is not None):
        if losses[a] < losses[best]:
            best = a
    best_s = None if best is None else awq_scales(xmean, best, wmean)
    if best_s is not None and fold:
        fold_scales(block, group, best_s)
    return best, best_s, losses


def clip_groups(module: nn.Module):
    """``(group size, groups per row)`` of ``module``'s weight spec for clipping, or None
    when its scales do not follow a range per row or group (per-tensor, 2-D blocks)."""
    spec = weight_spec(module)
    if spec is None or spec.format.startswith("gguf_"):
        # GGUF block types: scales (and mins) come from lowbit.core.ggml's importance-
        # weighted search, not from a range that a ratio could shrink
        return None
    w = weight_2d(module)
    if spec.granularity == "group" and spec.axis in (-1, 1):
        return spec.group_size, w.shape[1] // spec.group_size
    if spec.granularity == "channel" and spec.axis == 0:
        return w.shape[1], 1
    return None


def _fixed_scales(w: torch.Tensor, ratio: torch.Tensor, spec, g: int, nv_amax):
    """Scales of ``w [O, I]`` with each group's range shrunk by ``ratio [O, G]``."""
    o, i = w.shape
    shrunk = (w.reshape(o, i // g, g) * ratio[..., None]).reshape(o, i)
    return quantize(shrunk, spec, amax=nv_amax)


@torch.no_grad()
def awq_clip(module: nn.Module, x: torch.Tensor, grid: int = 20, min_ratio: float = 0.5,
             rows_per_batch: int = 256, token_weight: str = "none") -> float | None:
    """Clipping search of ``module``'s weight on inputs ``x [tokens, in]``; sets the weight
    quantizer's fixed scales and returns the mean kept ratio (None: not applicable).
    ``token_weight="norm"``: each token's input scaled to unit norm (its error counts
    relative to its size)."""
    shape = clip_groups(module)
    if shape is None or x.numel() == 0:
        return None
    g, n_groups = shape
    spec = weight_spec(module)
    w = weight_2d(module).detach().float()
    o, i = w.shape
    bf = spec.block_format
    nv_amax = w.abs().amax() if bf is not None and bf.global_scale else None
    x = x.float()
    if token_weight == "norm":
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    xg = x.reshape(-1, n_groups, g)
    best_err = torch.full((o, n_groups), float("inf"), device=w.device)
    best_r = torch.ones(o, n_groups, device=w.device)
    ratios = torch.linspace(1.0, min_ratio, grid).tolist() if grid > 1 else [1.0]
    for r in ratios:
        qt = _fixed_scales(w, torch.full((o, n_groups), r, device=w.device), spec, g, nv_amax)
        q = fake_quant(w, spec, scale=qt.scale, zero_point=qt.zero_point,
                       global_scale=qt.global_scale)
        d = (q - w).reshape(o, n_groups, g)
        err = torch.empty(o, n_groups, device=w.device)
        for r0 in range(0, o, rows_per_batch):
            r1 = min(o, r0 + rows_per_batch)
            err[r0:r1] = torch.einsum("ogk,tgk->ogt", d[r0:r1], xg).square().sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    qt = _fixed_scales(w, best_r, spec, g, nv_amax)
    module.weight_quantizer.set_fixed_scale(qt.scale, qt.zero_point, qt.global_scale)
    module.invalidate_weight_cache()
    return float(best_r.mean())
