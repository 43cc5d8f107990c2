"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

For a group of linears reading one input ``X`` (q/k/v, gate/up, or the linear after a
foldable linear), ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``max|W_j|`` over the
rows of every linear of the group; ``X diag(s)^-1`` and ``W diag(s)`` are folded into the
model (:func:`lowbit.algorithms.smoothing.fold_scales`), so the full-precision function is
unchanged while the activations lose their outlier channels. ``alpha`` is fixed (0.5) or
searched on a grid, per group, minimising the group's output error with weights and
activations fake-quantized (:class:`~lowbit.algorithms.smoothing.GroupProbe`).
"""

from __future__ import annotations

import torch

from lowbit.adapters import InputGroup
from lowbit.algorithms.smoothing import GroupProbe, fold_scales, search_grid, weight_2d

EPS = 1e-5


def smoothquant_scales(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (``[in]`` each)."""
    xmax = xmax.float().clamp_min(EPS)
    wmax = wmax.float().clamp_min(EPS)
    s = xmax.pow(alpha) / wmax.pow(1 - alpha)
    return s.clamp_min(EPS)


def group_weight_max(block, group: InputGroup) -> torch.Tensor:
    """``max|W_j|`` over the rows of every linear of the group: ``[in]``."""
    return torch.stack([weight_2d(block.get_submodule(n)).detach().float().abs().amax(0)
                        for n in group.linears]).amax(0)


@torch.no_grad()
def smooth_group(block, group: InputGroup, xmax: torch.Tensor, alpha: float = 0.5,
                 probe: GroupProbe | None = None, grid: list[float] | None = None,
                 fold: bool = True, refine: bool = False) -> tuple[float, torch.Tensor, dict]:
    """SmoothQuant one group (folded in place with ``fold``); returns ``(alpha, s, losses)``.

    With ``probe`` and ``grid``, every alpha of the grid is scored (and ``alpha`` itself, so
    that the search never does worse than the fixed value) and the best is folded; with
    ``refine``, a coarse pass over the grid and then the points around its best
    (:func:`~lowbit.algorithms.smoothing.search_grid`).
    ``fold`` uses :func:`~lowbit.algorithms.smoothing.fold_scales` (the norm's kind is
    measured, the block's function is not checked); the pipeline passes ``fold=False`` and
    folds through ``BlockContext.fold``, which checks it.
    """
    # grouped-query v_proj -> o_proj: channels sharing a value channel share one scale
    wmax = group.tie(group_weight_max(block, group), "amax")
    xmax = group.tie(xmax.float(), "amax")
    losses = {}
    if probe is not None and grid:
        def loss(a):
            return probe.loss(smoothquant_scales(xmax, wmax, a))
        losses = search_grid(sorted(set(map(float, grid))), loss, refine)
        if float(alpha) not in losses:
            losses[float(alpha)] = loss(float(alpha))
        alpha = min(sorted(losses), key=losses.get)
    s = smoothquant_scales(xmax, wmax, alpha)
    if fold:
        fold_scales(block, group, s)
    return float(alpha), s, losses
