"""SmoothQuant and AWQ on one decoder block and its captured inputs.

SmoothQuant: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (``max|W_j|`` over the rows of all
linears sharing the input), folded upstream; optionally ``alpha`` searched on a grid to
minimise the quantized output error of the group.

AWQ: ``s = mean|X|^alpha`` normalised by ``sqrt(max(s) * min(s))``, ``alpha`` on a 20-point grid
in [0, 1) minimising ``sum_i ||Q(W_i diag(s)) (X diag(s)^-1)^T - W_i X^T||^2`` over the group's
linears (``Q`` = each module's own weight fake quantization), folded upstream; then a per-group
clipping search: the group's range shrunk by ``ratio`` in a grid, the ratio minimising the
group's output error is kept as the weight quantizer's fixed scales.
"""

from __future__ import annotations

import torch

from lowbit.adapters import InputGroup
from lowbit.algorithms.smoothing import fold_scales, weight_2d
from lowbit.core import fake_quant, quantize


def _subsample(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


def _wspec(m):
    q = getattr(m, "weight_quantizer", None)
    return q.spec if q is not None and q.is_enabled else None


def _ispec(m):
    q = getattr(m, "input_quantizer", None)
    return q.spec if q is not None and q.is_enabled else None


@torch.no_grad()
def group_error(block, group: InputGroup, x: torch.Tensor, s: torch.Tensor | None,
                quant_input: bool = False) -> float:
    """Squared output error of the group's linears with weights (and optionally inputs)
    scaled by ``s`` and fake-quantized, against the FP outputs."""
    err = 0.0
    xs = x / s if s is not None else x
    if quant_input:
        m0 = block.get_submodule(group.linears[0])
        ispec = _ispec(m0)
        if ispec is not None:
            xs = fake_quant(xs, ispec.model_copy(update={"dynamic": True}) if
                            ispec.granularity in ("tensor", "channel") else ispec)
    for name in group.linears:
        m = block.get_submodule(name)
        w = weight_2d(m).float()
        spec = _wspec(m)
        ws = w * s[None, :] if s is not None else w
        q = fake_quant(ws, spec) if spec is not None else ws
        err += float(((xs @ q.t()) - (x @ w.t())).square().sum())
    return err


@torch.no_grad()
def smoothquant_group(block, group: InputGroup, x: torch.Tensor, alpha: float = 0.5,
                      search: bool = False, grid: int = 11, max_tokens: int = 4096) -> float:
    """SmoothQuant one input group; returns the alpha used."""
    xmax = x.abs().amax(0).clamp_min(1e-5)
    wmax = torch.stack([weight_2d(block.get_submodule(n)).float().abs().amax(0)
                        for n in group.linears]).amax(0).clamp_min(1e-5)

    def scales(a):
        return (xmax.pow(a) / wmax.pow(1 - a)).clamp_min(1e-5)

    if search:
        xs = _subsample(x, max_tokens)
        best = min((group_error(block, group, xs, scales(a), quant_input=True), a)
                   for a in torch.linspace(0.05, 0.95, grid).tolist())
        alpha = best[1]
    fold_scales(block, group, scales(alpha))
    return alpha


@torch.no_grad()
def awq_group(block, group: InputGroup, x: torch.Tensor, grid: int = 20,
              max_tokens: int = 4096) -> float:
    """AWQ scale search for one group (folded in place); returns the best alpha."""
    xs = _subsample(x, max_tokens)
    xmean = xs.abs().mean(0).clamp_min(1e-8)
    best = (group_error(block, group, xs, None), None)
    best_s = None
    for a in [i / grid for i in range(grid)]:
        s = xmean.pow(a).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        e = group_error(block, group, xs, s)
        if e < best[0]:
            best, best_s = (e, a), s
    if best_s is not None:
        fold_scales(block, group, best_s)
    return best[1] if best[1] is not None else 0.0


@torch.no_grad()
def awq_clip(module, x: torch.Tensor, grid: int = 20, min_ratio: float = 0.5,
             max_tokens: int = 2048) -> float | None:
    """Per-group clipping search of ``module``'s weight (fixed scales); returns mean ratio.

    Only for grouped specs whose scales follow a group amax (integer and float element
    formats); block formats (NVFP4, MX) keep their own scales.
    """
    spec = _wspec(module)
    if spec is None or spec.granularity != "group" or spec.block_format is not None:
        return None
    w = weight_2d(module).float()
    out_f, in_f = w.shape
    g = spec.group_size
    G = in_f // g
    xs = _subsample(x, max_tokens)
    wg = w.reshape(out_f, G, g)
    xg = xs.reshape(-1, G, g)
    if spec.symmetric:
        hi0, lo0 = wg.abs().amax(-1), None
    else:
        hi0, lo0 = wg.amax(-1).clamp_min(0), wg.amin(-1).clamp_max(0)
    best_err = torch.full((out_f, G), float("inf"))
    best_ratio = torch.ones(out_f, G)
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        hi = hi0 * r
        lo = lo0 * r if lo0 is not None else None
        q = fake_quant(w, spec, amax=hi, amin=lo).reshape(out_f, G, g)
        d = q - wg
        err = torch.einsum("ogk,tgk->ogt", d, xg).square().sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    hi = hi0 * best_ratio
    lo = lo0 * best_ratio if lo0 is not None else None
    qt = quantize(w, spec, amax=hi, amin=lo)
    module.weight_quantizer.set_fixed_scale(qt.scale, qt.zero_point)
    module.invalidate_weight_cache()
    return float(best_ratio.mean())
