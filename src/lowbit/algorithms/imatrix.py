"""The ``imatrix`` step: importance-weighted rounding of the GGUF block types (llama.cpp's
importance matrix).

For every quantized linear whose weight spec is a ``gguf_*`` type (:mod:`lowbit.core.ggml`),
the importance of input channel ``i`` is ``mean_t x_ti^2`` over the calibration tokens
that reach the linear (llama.cpp's ``imatrix``: ``in_sum2 / counts``); the weight's scales
(sub-block scales, mins, super scales) are then searched by
:func:`lowbit.core.ggml.search_scales` to minimise ``sum_i imp_i (w_i - q_i)^2`` and fixed
on its quantizer (``set_fixed_scale``), so that fake quant, the exporters and a reload use
them. The routed experts of an MoE block get their own importance from the tokens routed
to them (llama.cpp counts tokens per expert); an expert no token reached keeps the
data-free weighting, stated on its experts module.

Arguments: ``file`` (None): a llama.cpp imatrix GGUF file (``llama-imatrix -o``) instead of
calibration data; the pipeline reads it and maps its tensor names to modules
(:func:`lowbit.pipeline.algorithms.run_algorithms`), then :func:`apply_importance` sets the
scales model-wide before the block steps run.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.mha import linear_input

IMATRIX_ARGS = {"file": None}


def is_ggml(module: nn.Module) -> bool:
    """Whether ``module``'s enabled weight quantizer has a ``gguf_*`` spec."""
    q = getattr(module, "weight_quantizer", None)
    return q is not None and q.is_enabled and q.spec.format.startswith("gguf_")


@torch.no_grad()
def set_importance_scales(module: nn.Module, importance: torch.Tensor | None,
                          name: str = "weight") -> None:
    """Fix the scales of ``module``'s ``gguf_*`` weight (``[out, in]`` view) from
    :func:`lowbit.core.ggml.search_scales` with ``importance [in]`` (mean ``x^2`` per input
    channel; None: llama.cpp's data-free weighting)."""
    from lowbit.core.ggml import ggml_type, search_scales

    q = module.weight_quantizer
    w = module.weight_2d().detach().float()
    if importance is not None:
        importance = importance.detach().to(w.device, torch.float32).reshape(-1)
        if importance.numel() != w.shape[1]:
            raise CalibrationError(f"imatrix {name}: importance of {importance.numel()} "
                                   f"values; expected {w.shape[1]} (in_features)")
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise CalibrationError(f"imatrix {name}: the importance has negative or "
                                   "non-finite values; expected mean squares (>= 0)")
    s, z, gs = search_scales(w, ggml_type(q.spec), importance)
    q.set_fixed_scale(s, z, gs)
    module.invalidate_weight_cache()


def _square_sum_hooks(acc: dict[str, list], names: list[str], mods: list[nn.Module]) -> list:
    """Forward pre-hooks adding each linear's ``sum_t x_t^2`` (float64 ``[in]``) and token
    count into ``acc[name] = [sum or None, tokens]``; returns the handles to remove."""
    def hook(mod, a, k, n):
        x = linear_input(mod, a, k, n).detach()
        x = x.reshape(-1, x.shape[-1]).float()
        sq = x.square().sum(0).double()
        acc[n][0] = sq if acc[n][0] is None else acc[n][0] + sq
        acc[n][1] += x.shape[0]

    return [m.register_forward_pre_hook(lambda mod, a, k, n=n: hook(mod, a, k, n),
                                        with_kwargs=True) for n, m in zip(names, mods)]


def collect_importance(ctx, names: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (sum_t x_t^2 float64 [in], tokens)}`` of the block's linears ``names`` over
    all its captured inputs (and ranks), block weights in full precision, experts seeing
    only the tokens routed to them (as llama.cpp counts them)."""
    acc: dict[str, list] = {n: [None, 0] for n in names}
    mods = [ctx.block.get_submodule(n) for n in names]

    hs = _square_sum_hooks(acc, names, mods)
    try:
        with ctx.weights_fp():
            ctx.run(until=mods)
    finally:
        for h in hs:
            h.remove()
    if ctx.comm.enabled:  # every rank, every linear, one order
        for n, m in zip(names, mods):
            st = acc[n]
            if st[0] is None:
                st[0] = torch.zeros(m.weight_2d().shape[1], dtype=torch.float64,
                                    device=m.weight.device)
            ctx.comm.sum_(st[0])
            st[1] = ctx.comm.sum_int(st[1])
    return {n: (st[0], st[1]) for n, st in acc.items()}


@torch.no_grad()
def collect_model_importance(model: nn.Module, names: list[str], forward_loop,
                             comm=None) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (sum_t x_t^2 float64 [in], tokens)}`` of ``model``'s linears ``names`` over
    one run of ``forward_loop(model)`` (for the linears outside the decoder blocks, e.g. the
    output layer); ``comm``: a :class:`lowbit.pipeline.distributed.Collective` summing the
    ranks' statistics."""
    acc: dict[str, list] = {n: [None, 0] for n in names}
    mods = [model.get_submodule(n) for n in names]

    hs = _square_sum_hooks(acc, names, mods)
    try:
        forward_loop(model)
    finally:
        for h in hs:
            h.remove()
    for n, m in zip(names, mods):
        st = acc[n]
        if st[0] is None:
            st[0] = torch.zeros(m.weight_2d().shape[1], dtype=torch.float64,
                                device=m.weight.device)
        if comm is not None and comm.enabled:
            comm.sum_(st[0])
            st[1] = comm.sum_int(st[1])
    return {n: (st[0], st[1]) for n, st in acc.items()}


def imatrix_step(ctx, args: dict) -> None:
    """Importance-weighted scales for every ``gguf_*`` linear of the block (module doc)."""
    if args.get("file") is not None:
        # the pipeline applies a file's importance before the block steps run; only the
        # rest of the recipe reaches the block runner
        raise ConfigError("imatrix: a step with file= is applied by "
                          "lowbit.pipeline.algorithms.run_algorithms, not per block")
    names = [n for n in ctx.quantized_linears()
             if ctx.selected(n) and is_ggml(ctx.block.get_submodule(n))]
    if not names:
        return
    from lowbit.pipeline.moe import expert_of, note

    got = collect_importance(ctx, names)
    counts = {}
    for n in names:
        sq, tokens = got[n]
        m = ctx.block.get_submodule(n)
        if tokens == 0:  # an expert no token was routed to (or a linear never called)
            found = expert_of(ctx.block, n)
            if found is not None:
                note(found[1], found[2], "imatrix: no routed token, data-free weighting")
            ctx.info.setdefault("imatrix_no_tokens", []).append(n)
            set_importance_scales(m, None, f"{ctx.name}.{n}")
            continue
        set_importance_scales(m, (sq / tokens).float(), f"{ctx.name}.{n}")
        counts[n] = tokens
    ctx.info["imatrix_tokens"] = counts


def apply_importance(model: nn.Module, importance: dict[str, torch.Tensor]) -> dict:
    """Set the scales of every ``gguf_*`` linear of ``model`` named in ``importance``
    (``{module name: mean x^2 [in]}``, e.g. from a llama.cpp imatrix file). Returns
    ``{"imatrix_file": [names set], "imatrix_file_missing": [gguf linears without an
    entry, left to the data-free weighting]}``."""
    done, missing = [], []
    for n, m in model.named_modules():
        if not is_ggml(m):
            continue
        if n not in importance:
            missing.append(n)
            continue
        set_importance_scales(m, importance[n], n)
        done.append(n)
    return {"imatrix_file": done, "imatrix_file_missing": missing}
