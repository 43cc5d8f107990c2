"""The algorithm steps a recipe can name: ``smoothquant``, ``awq``, ``gptq``, ``imatrix``.

Each is ``fn(ctx, args)`` on one decoder block (``ctx``: a
:class:`lowbit.pipeline.blocks.BlockContext`, which runs the block on its captured inputs
and keeps per-channel statistics of its linears' inputs); the block runner calls it for
every block. Arguments and defaults (the recipe's ``args`` override them):

* ``smoothquant``: ``alpha`` 0.5; ``search`` false (true: ``alpha`` per group from ``alpha``
  and a grid of ``grid`` values ``1/grid, 2/grid, ..., 1``, scored with weights and
  activations fake-quantized); ``refine`` false (true: a coarse pass over the grid, then
  the points around its best, :func:`lowbit.algorithms.smoothing.search_grid`); ``loss``
  ``module`` (the output error of the module holding the group, on ``max_tokens`` tokens of
  the block's inputs run up to it) or ``linears`` (the group's own linears on the token
  sample the statistics pass keeps, ``max_tokens`` tokens spread over all the inputs: no
  extra pass over the block); ``max_rows`` None (with ``loss: linears``: each linear scored
  on at most this many of its output rows, evenly spaced, its error scaled up to the whole
  -- :class:`~lowbit.algorithms.smoothing.GroupProbe`; the scoring matmuls shrink by
  ``out / max_rows``); ``forward_dtype`` ``float32`` (``bfloat16``: the statistics pass, and
  the float outputs it keeps for ``feed: fp``, under bfloat16 autocast; when an earlier
  step of the block already computed the statistics they are reused as they are);
  ``pairs`` true (also ``v_proj -> o_proj``, ``up_proj -> down_proj`` where they fit);
  ``max_tokens`` 2048 (tokens of the search sample); ``amax_from_stats`` true (static
  per-tensor ``max`` input quantizers of the smoothed linears take ``max_j |X_j| / s_j``
  from the statistics SmoothQuant already has, so the block needs no calibration pass);
  ``fold_tol`` None (every fold must keep the block's float output within this relative
  error on its captured inputs, else it is undone and refused with a
  :class:`~lowbit.errors.CalibrationError`; None: 1e-4 in float32, 5e-3 in float16, 5e-2 in
  bfloat16, see :func:`lowbit.algorithms.smoothing.fold_tolerance`).
* ``awq``: ``grid`` 20; ``refine`` false (as for SmoothQuant); ``pairs`` true;
  ``max_tokens`` 2048; ``duo_scaling`` false;
  ``loss`` ``module`` (error of the module holding the group) or ``linears``; ``act_quant``
  false; ``clip`` true, ``clip_grid`` 20, ``min_ratio`` 0.5, ``clip_tokens`` 512,
  ``clip_skip`` (q/k projections, as AutoAWQ); ``token_weight`` ``none`` (``norm``: errors
  and input statistics per token relative to its size, as for GPTQ); ``guard`` true (the
  block's output error on the search sample, weights quantized, is measured before and
  after: when AWQ made it worse, the block is put back as it was, with a warning and a note
  in the block's row of the report); ``fold_tol`` as for SmoothQuant (the float function
  is checked after every fold, whatever ``guard`` says).
* ``gptq``: ``block_size`` 128, ``percdamp`` 0.01, ``act_order`` false, ``static_groups``
  true, ``dtype`` ``float32`` (or ``float64`` Hessians), ``true_sequential`` true (each
  group of linears reading one input gets its Hessian after the groups before it are
  quantized), ``token_weight`` ``none`` (``norm``: every calibration token scaled to unit
  norm in the Hessian, ``H = sum x x^T / ||x||^2``, so that a few tokens with massive
  activations do not dominate it), ``forward_dtype`` ``float32`` (``bfloat16``: the block's
  passes that collect Hessians run under CPU/CUDA autocast to bfloat16, 2-3x faster matmuls
  on CPUs with bfloat16 instructions; the Hessians still accumulate in ``dtype``; the pass
  that feeds the next block stays in the model's dtype, so it cannot reuse the outputs the
  bfloat16 passes computed, see :meth:`lowbit.pipeline.blocks.BlockContext.memoize`).
  Linears sharing one Hessian (q/k/v, gate/up) whose rows GPTQ treats separately are
  quantized in one call, rows stacked; after each group its linears (and the modules holding
  only final linears) are memoized for the block's later passes. On ``gguf_*`` specs each super-block's scales come from
  the importance-weighted search with the Hessian's diagonal (see :mod:`lowbit.algorithms.gptq`).
* ``smoothquant`` and ``awq`` skip a group whose linears hold an online ``input_rotation``
  (or whose norm's output is rotated online, :mod:`lowbit.algorithms.rotate`): a scale
  cannot be folded across the rotation; the block's report row gets a note, and a warning.
* ``imatrix``: ``file`` None (a llama.cpp imatrix GGUF file instead of calibration data);
  importance-weighted scales of the ``gguf_*`` weights (:mod:`lowbit.algorithms.imatrix`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from lowbit.adapters import groups_by_inspection
from lowbit.algorithms.awq import awq_clip, awq_search
from lowbit.algorithms.gptq import HessianAccumulator, gptq_quantize_weight
from lowbit.algorithms.imatrix import IMATRIX_ARGS, imatrix_step
from lowbit.algorithms.smoothing import GroupProbe, input_spec, weight_spec
from lowbit.algorithms.smoothquant import smooth_group
from lowbit.config.recipe import match
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.mha import linear_input
from lowbit.pipeline.algorithms import register_algorithm

if TYPE_CHECKING:
    from lowbit.pipeline.blocks import LinearStats

SMOOTHQUANT_ARGS = {"alpha": 0.5, "search": False, "grid": 10, "refine": False,
                    "loss": "module", "pairs": True, "max_tokens": 2048,
                    "amax_from_stats": True, "fold_tol": None, "max_rows": None,
                    "forward_dtype": "float32"}
AWQ_ARGS = {"grid": 20, "refine": False, "pairs": True, "max_tokens": 2048, "duo_scaling": False,
            "loss": "module", "act_quant": False, "clip": True, "clip_grid": 20,
            "min_ratio": 0.5, "clip_tokens": 512, "guard": True, "token_weight": "none",
            "fold_tol": None,
            "clip_skip": ["*q_proj", "*k_proj", "*query*", "*key*", "*qkv*", "*c_attn"]}
GPTQ_ARGS = {"block_size": 128, "percdamp": 0.01, "act_order": False, "static_groups": True,
             "dtype": "float32", "true_sequential": True, "token_weight": "none",
             "forward_dtype": "float32"}


def group_stats(stats: dict, group) -> "LinearStats | None":
    """Statistics of the input ``group``'s linears share. Linears that saw different tokens
    (the routed experts of an MoE block reading the norm's output, each from the tokens
    routed to it) are merged: the largest ``absmax``, token-weighted means (exact when every
    token reaches the same number of the group's linears, as top-k routing does) and every
    sample. None when none of them saw a token."""
    from lowbit.pipeline.blocks import LinearStats

    have = [stats[n] for n in group.linears if n in stats]
    if not have:
        return None
    if len(have) == len(group.linears) and len({st.n_tokens for st in have}) == 1:
        return have[0]
    n = sum(st.n_tokens for st in have)
    means = have[0].absmean is not None
    return LinearStats(torch.stack([st.absmax for st in have]).amax(0),
                       sum(st.absmean * st.n_tokens for st in have) / n if means else None,
                       sum(st.nabsmean * st.n_tokens for st in have) / n if means else None,
                       n, torch.cat([st.sample for st in have]))


def _all(ctx, group, pred) -> bool:
    return all(ctx.selected(n) and pred(ctx.block.get_submodule(n)) for n in group.linears)


def _one_input(m) -> bool:
    """Whether ``m`` is called on one tensor (a Linear or GPT-2 Conv1D, not an
    ``nn.MultiheadAttention``'s in-projection)."""
    from lowbit.adapters.base import is_conv1d
    return isinstance(m, torch.nn.Linear) or is_conv1d(m)


def _targets(group, loss: str) -> list[str]:
    if loss == "module":
        return [group.parent]
    if loss == "linears":
        return list(group.linears)
    raise ConfigError(f"awq: loss must be 'module' or 'linears', got {loss!r}")


def _fold_tol(name: str, args: dict) -> float | None:
    tol = args["fold_tol"]
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ConfigError(f"{name}: fold_tol must be a relative error in (0, 1) or null, got "
                          f"{tol!r}")
    return float(tol)


def _across_rotation(ctx, group) -> str | None:
    """What makes a scale unfoldable for ``group``: a linear of it with an online
    ``input_rotation`` (the scale would have to pass through the rotation), or a ``prev``
    norm whose output is rotated online; None when nothing does."""
    for n in group.linears:
        if ctx.block.get_submodule(n)._modules.get("input_rotation") is not None:
            return f"{n} has an online input_rotation"
    if group.prev is not None and group.prev_kind == "norm":
        prev = ctx.block.get_submodule(group.prev)
        if prev._modules.get("output_rotation") is not None:
            return f"{group.prev} has an online output_rotation"
    return None


def _skip_rotated(ctx, groups: list, step: str) -> list:
    """``groups`` without those a scale cannot be folded across (:func:`_across_rotation`);
    the skipped ones get one note in the block's report row and one warning."""
    keep, skipped = [], []
    for g in groups:
        why = _across_rotation(ctx, g)
        if why is None:
            keep.append(g)
        else:
            skipped.append(f"{g.prev or '-'} -> {', '.join(g.linears)} ({why})")
    if skipped:
        note = (f"{step}: block {ctx.name}: {len(skipped)} group(s) skipped, a scale cannot be "
                f"folded across an online rotation: {'; '.join(skipped)}")
        ctx.info.setdefault("notes", []).append(note)
        warnings.warn(note, stacklevel=3)
    return keep


def smoothquant_step(ctx, args: dict) -> None:
    """SmoothQuant on every group whose linears quantize their inputs (groups behind an
    online rotation are skipped, with a note)."""
    tol = _fold_tol("smoothquant", args)
    groups = [g for g in ctx.scale_groups(pairs=bool(args["pairs"]))
              if _all(ctx, g, lambda m: weight_spec(m) is not None and
                      input_spec(m) is not None)]
    groups = _skip_rotated(ctx, groups, "smoothquant")
    if not groups:
        return
    if args["loss"] not in ("module", "linears"):
        raise ConfigError(f"smoothquant: loss must be 'module' or 'linears', got "
                          f"{args['loss']!r}")
    max_rows = args["max_rows"]
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int)
                                 or max_rows < 1):
        raise ConfigError(f"smoothquant: max_rows must be a positive number of output rows "
                          f"(or None: every row), got {max_rows!r}")
    if max_rows is not None and args["loss"] != "linears":
        raise ConfigError(f"smoothquant: max_rows={max_rows} scores the group's own linears; "
                          "it needs loss='linears'")
    on_sample = args["search"] and args["loss"] == "linears"
    if on_sample and ctx._stats is None:  # the statistics pass keeps the search's tokens
        ctx.sample_tokens = int(args["max_tokens"])
    if args["forward_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"smoothquant: forward_dtype must be 'float32' or 'bfloat16', got "
                          f"{args['forward_dtype']!r}")
    # SmoothQuant reads absmax (and the sample); with forward_dtype bfloat16 the statistics
    # pass (and the float outputs it keeps for feed="fp") runs under bfloat16 autocast
    with _autocast(ctx.block, args["forward_dtype"] == "bfloat16"):
        stats = ctx.linear_stats(means=False)
    grid = None
    if args["search"]:
        n = int(args["grid"])
        grid = [round(i / n, 4) for i in range(1, n + 1)] if n > 1 else [float(args["alpha"])]
        sample = None if on_sample else ctx.sample(int(args["max_tokens"]))
    alphas = []
    for g in groups:
        probe = None
        if grid is not None and group_stats(stats, g) is not None:
            plain = all(_one_input(ctx.block.get_submodule(n)) for n in g.linears)
            if on_sample and not plain:
                ctx.info.setdefault("notes", []).append(
                    f"smoothquant: group {'/'.join(g.linears)} takes more than one input "
                    "tensor: scored with loss=module" +
                    ("" if max_rows is None else ", every output row (max_rows not applied)"))
            if on_sample and plain:  # each linear on its input's token sample (global)
                dt = {n: ctx.block.get_submodule(n).weight.dtype for n in g.linears}
                probe = GroupProbe(ctx.block, g, {n: [((stats[n].sample.to(dt[n]),), {})]
                                                  for n in g.linears}, act_quant=True,
                                   max_rows=max_rows, direct=True)
            else:
                probe = GroupProbe(ctx.block, g, ctx.capture(_targets(g, "module"), sample),
                                   act_quant=True, reduce=ctx.comm.sum_float)
        st = group_stats(stats, g)
        if st is None:  # an expert no token reached, without moe_calibrate_all_experts
            _no_tokens(ctx, g, "smoothquant")
            continue
        alpha, s, _ = smooth_group(ctx.block, g, st.absmax, float(args["alpha"]), probe,
                                   grid, fold=False, refine=bool(args["refine"]))
        ctx.fold(g, s, what="smoothquant", tol=tol)
        alphas.append(round(alpha, 3))
    ctx.info["smoothquant_alpha"] = alphas
    if args["amax_from_stats"]:
        ctx.info["amax_from_stats"] = _amax_from_stats(ctx, groups, stats)


def _amax_from_stats(ctx, groups, stats) -> int:
    """Static per-tensor ``max`` input quantizers of the smoothed linears get their amax from
    the (folded) per-channel statistics, ``max_j absmax_j``: what a calibration pass over the
    same inputs would observe (FP weights, up to rounding), without running it. Returns how
    many were set; the others are calibrated by the block runner's pass as usual."""
    n_set = 0
    for g in groups:
        for n in g.linears:
            iq = getattr(ctx.block.get_submodule(n), "input_quantizer", None)
            st = stats.get(n)
            # (the runner keeps static input quantizers off while the steps run)
            if st is None or iq is None or not iq.needs_calibration or iq.amax is not None:
                continue
            sp = iq.spec
            if sp.calibrator != "max" or sp.granularity != "tensor" or not sp.symmetric or \
                    sp.calibrator_args:
                continue
            iq.set_amax(st.absmax.max())
            n_set += 1
    return n_set


def _block_error(ctx, sample, ref) -> float:
    """Squared error of the block's outputs on ``sample`` (float64 sum over calls and ranks)."""
    outs = ctx.run(sample, collect=True)
    return ctx.comm.sum_float(sum(float((o.float() - r).square().sum())
                                  for o, r in zip(outs, ref)))


def awq_step(ctx, args: dict) -> None:
    """AWQ scale search on every group (and linear pair), then the clipping search."""
    _fold_tol("awq", args)
    if ctx._stats is None:
        ctx.sample_tokens = int(args["clip_tokens"])
    groups = [g for g in ctx.scale_groups(pairs=bool(args["pairs"]))
              if _all(ctx, g, lambda m: weight_spec(m) is not None)]
    groups = _skip_rotated(ctx, groups, "awq")
    stats = ctx.linear_stats()
    sample = ctx.sample(int(args["max_tokens"]))
    saved = None
    if args["guard"]:
        with ctx.weights_fp():
            ref = [o.float() for o in ctx.run(sample, collect=True)]
        before = _block_error(ctx, sample, ref)
        saved = ctx.snapshot()
    _awq(ctx, args, groups, stats, sample)
    ctx.verify_folds()  # a fold that broke the float function is refused, not reverted below
    if saved is not None:
        after = _block_error(ctx, sample, ref)
        ctx.info["awq_guard"] = [round(before, 6), round(after, 6)]
        if after > before:
            ctx.restore(saved)
            ctx.info["awq_reverted"] = True
            note = (f"awq: block {ctx.name}: AWQ made the block's quantized output error worse "
                    f"({before:.4g} -> {after:.4g} on the search sample): the block was put "
                    "back as it was before AWQ (no scales, no clipping)")
            ctx.info.setdefault("notes", []).append(note)
            warnings.warn(note, stacklevel=2)


def _awq(ctx, args, groups, stats, sample) -> None:
    alphas = []
    for g in groups:
        st = group_stats(stats, g)
        if st is None:  # an expert no token reached, without moe_calibrate_all_experts
            _no_tokens(ctx, g, "awq")
            alphas.append(None)
            continue
        probe = GroupProbe(ctx.block, g, ctx.capture(_targets(g, args["loss"]), sample),
                           act_quant=bool(args["act_quant"]), token_weight=args["token_weight"],
                           reduce=ctx.comm.sum_float)
        xmean = st.absmean if args["token_weight"] == "none" else st.nabsmean
        alpha, s, _ = awq_search(ctx.block, g, probe, xmean,
                                 int(args["grid"]), bool(args["duo_scaling"]), fold=False,
                                 refine=bool(args["refine"]))
        if s is not None:
            ctx.fold(g, s, what="awq", tol=_fold_tol("awq", args))
        alphas.append(alpha)
    ctx.info["awq_alpha"] = alphas
    if args["clip"]:
        skip = list(args["clip_skip"] or [])
        ratios = {}
        ggml = []
        for n in ctx.quantized_linears():
            if not ctx.selected(n) or any(match(p, n) for p in skip) or n not in stats:
                continue
            if weight_spec(ctx.block.get_submodule(n)).format.startswith("gguf_"):
                ggml.append(n)
                continue
            r = awq_clip(ctx.block.get_submodule(n), stats[n].sample, int(args["clip_grid"]),
                         float(args["min_ratio"]), token_weight=args["token_weight"])
            if r is not None:
                ratios[n] = round(r, 4)
        ctx.info["awq_clip"] = ratios
        if ggml:
            ctx.info.setdefault("notes", []).append(
                f"awq: block {ctx.name}: no clip search for the {len(ggml)} gguf_* weights "
                "(their scales come from the importance-weighted search; an imatrix step "
                "after awq runs it on the scaled weights)")


def _no_tokens(ctx, group, step: str) -> None:
    """Note on the experts of ``group`` that ``step`` found no token to scale them by."""
    from lowbit.pipeline.moe import expert_of, note

    for n in group.linears:
        found = expert_of(ctx.block, n)
        if found is not None:
            note(found[1], found[2], f"{step}: no per-expert scale (no token reached it)")


def _rtn_experts(ctx, names: list[str]) -> set[str]:
    """The expert linears among ``names`` that GPTQ leaves to RTN: without
    ``moe_calibrate_all_experts``, those of experts routed fewer than ``moe_min_tokens``
    tokens (noted on their experts module for the report)."""
    from lowbit.pipeline.moe import GPTQ_RTN, expert_of, min_tokens, note

    out = set()
    if ctx.moe_all:
        return out
    for n in names:
        found = expert_of(ctx.block, n)
        if found is None:
            continue
        _, mod, e = found
        if int(mod.routed_tokens[e]) < min_tokens(mod, ctx.moe_min_tokens):
            out.add(n)
            note(mod, e, GPTQ_RTN)
    return out


def _sequential_groups(ctx, names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    a, k = ctx.call(ctx.chunks[0].head(1))
    with ctx.weights_fp(), ctx.all_experts():
        groups = groups_by_inspection(ctx.block, a, k)
    order = [[n for n in g.linears if n in names] for g in groups]
    seen = {n for g in order for n in g}
    order.append([n for n in names if n not in seen])  # never called on this input
    return [g for g in order if g]


def _autocast(block, on: bool):
    """bfloat16 autocast on the block's device type (a no-op context when ``on`` is false)."""
    import contextlib
    if not on:
        return contextlib.nullcontext()
    dev = next((p.device.type for p in block.parameters()), "cpu")
    return torch.autocast(dev, dtype=torch.bfloat16)


#: linears of a GPTQ group called on the same tensor accumulate one Hessian (tests switch it
#: off to check that the results are the same bit for bit)
SHARE_HESSIANS = True


def gptq_step(ctx, args: dict) -> None:
    """GPTQ of every quantized linear of the block, Hessians from the block's inputs."""
    if args["dtype"] not in ("float32", "float64"):
        raise ConfigError(f"gptq: dtype must be 'float32' or 'float64', got {args['dtype']!r}")
    dtype = torch.float64 if args["dtype"] == "float64" else torch.float32
    if args["token_weight"] not in ("none", "norm"):
        raise ConfigError(f"gptq: token_weight must be 'none' or 'norm', got "
                          f"{args['token_weight']!r}")
    norm = args["token_weight"] == "norm"
    if args["forward_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"gptq: forward_dtype must be 'float32' or 'bfloat16', got "
                          f"{args['forward_dtype']!r}")
    bf16 = args["forward_dtype"] == "bfloat16"

    def add(acc, x):
        if norm:  # every token counts relative to its size: H = sum x x^T / ||x||^2
            x = x.float()
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        acc.add(x)

    names = [n for n in ctx.quantized_linears() if ctx.selected(n)]
    rtn = _rtn_experts(ctx, names)
    if rtn:
        ctx.info["gptq_rtn"] = sorted(rtn)
    names = [n for n in names if n not in rtn]
    if not names:
        return
    losses = {}
    groups = _sequential_groups(ctx, names, bool(args["true_sequential"]))
    for i, grp in enumerate(groups):
        mods = [ctx.block.get_submodule(n) for n in grp]
        later = [ctx.block.get_submodule(n) for g in groups[i:] for n in g]
        accs = {n: HessianAccumulator(m.weight_2d().shape[1], dtype) for n, m in zip(grp, mods)}
        # linears called on the very same tensor (q/k/v, gate/up without online rotations)
        # share one Hessian: accumulated once, copied (the same sums, bit for bit)
        last, owner = {}, {}

        def hook(mod, a, k, n):
            x = linear_input(mod, a, k, n)
            o = next((m for m, y in last.items() if y is x and m != n), None) \
                if SHARE_HESSIANS else None
            if o is not None and owner.setdefault(n, o) == o and accs[n].n_tokens == 0:
                return
            if owner.pop(n, None) is not None:  # shared on an earlier chunk, not now
                raise CalibrationError(f"gptq {ctx.name}.{n}: its input was another "
                                       "linear's tensor on some chunks only")
            last[n] = x
            add(accs[n], x)

        hooks = [m.register_forward_pre_hook(
            lambda mod, a, k, n=n: hook(mod, a, k, n), with_kwargs=True)
            for n, m in zip(grp, mods)]
        try:  # this group and the later ones in full precision, the earlier ones quantized
            with ctx.weights_fp(later), ctx.all_experts(), _autocast(ctx.block, bf16):
                ctx.run(until=mods)
        finally:
            for h in hooks:
                h.remove()
            last.clear()
        units = _solve_units(grp, mods, owner)
        for unit in units:  # a shared Hessian copied for a linear solved on its own
            head = owner.get(unit[0])
            if head is not None:
                accs[unit[0]].H, accs[unit[0]].n_tokens = accs[head].H.clone(), \
                    accs[head].n_tokens
        if ctx.comm.enabled:  # data-parallel: sum the ranks' Hessians (see pipeline.distributed)
            for n in grp:  # every linear, in one order on every rank (a stacked one's is unused)
                accs[n].all_reduce(ctx.comm.group)
        byname = dict(zip(grp, mods))
        for unit in units:
            head = unit[0]
            if accs[head].n_tokens == 0:  # never called on the block's inputs: RTN, stated
                ctx.info.setdefault("gptq_no_tokens", []).extend(unit)
                continue
            ms = [byname[n] for n in unit]
            ws = [m.weight_2d().detach() for m in ms]
            # the accumulator's H is handed over: GPTQ overwrites it and releases its memory
            # once inverted (one [in, in] matrix less at the peak); linears sharing it are
            # solved in one call, their rows stacked (rows_separable: the same result)
            r = gptq_quantize_weight(ws[0] if len(ws) == 1 else torch.cat(ws), accs.pop(head).H,
                                     ms[0].weight_quantizer.spec,
                                     block_size=int(args["block_size"]),
                                     percdamp=float(args["percdamp"]),
                                     act_order=bool(args["act_order"]),
                                     static_groups=bool(args["static_groups"]),
                                     name=f"{ctx.name}.{'+'.join(unit)}", overwrite_hessian=True)
            r0 = 0
            for n, m, w in zip(unit, ms, ws):
                rows = slice(r0, r0 + w.shape[0])
                r0 += w.shape[0]
                with torch.no_grad():
                    m.weight.copy_(m.weight_from_2d(r.weight[rows]).to(m.weight.dtype))
                zp = None if r.zero_point is None else r.zero_point[rows]
                m.weight_quantizer.set_fixed_scale(r.scale[rows] if len(unit) > 1 else r.scale,
                                                   zp if len(unit) > 1 else r.zero_point,
                                                   r.global_scale)
                m.invalidate_weight_cache()
                losses[n] = round(float(r.row_loss[rows].sum()), 6)
            del r
        # final now: the later passes (and the one feeding the next block) reuse their outputs
        ctx.memoize(grp)
    ctx.info["gptq_loss"] = losses


#: linears sharing a Hessian whose rows GPTQ treats separately are quantized in one call
#: (tests switch it off: the results are the same bit for bit)
BATCH_SHARED = True


def _solve_units(grp: list[str], mods: list, owner: dict[str, str]) -> list[list[str]]:
    """The GPTQ calls of a group, in order: ``[head, *others]`` where ``others`` read the
    same tensor as ``head`` (``owner``: linear -> the one whose Hessian it shares; chains are
    resolved in place) and can be stacked with it (same spec, dtype and input width, rows
    separable: :func:`~lowbit.algorithms.gptq.rows_separable`), else ``[name]`` alone (the
    caller then copies the shared Hessian for it)."""
    from lowbit.algorithms.gptq import rows_separable

    for n in list(owner):
        o = owner[n]
        while o in owner:
            o = owner[o]
        owner[n] = o
    byname = dict(zip(grp, mods))
    members: dict[str, list[str]] = {}
    for n in grp:
        members.setdefault(owner.get(n, n), []).append(n)
    out = []
    for head, ns in members.items():
        unit = [head] + [n for n in ns if n != head]
        ms = [byname[n] for n in unit]
        spec, dt = ms[0].weight_quantizer.spec, ms[0].weight.dtype
        if BATCH_SHARED and len(unit) > 1 and all(
                m.weight_quantizer.spec == spec and m.weight.dtype == dt and
                rows_separable(spec, tuple(m.weight_2d().shape)) for m in ms):
            out.append(unit)
        else:
            out.extend([n] for n in unit)
    return out


register_algorithm("smoothquant", smoothquant_step, args=SMOOTHQUANT_ARGS)
register_algorithm("awq", awq_step, args=AWQ_ARGS)
register_algorithm("gptq", gptq_step, args=GPTQ_ARGS)
register_algorithm("imatrix", imatrix_step, args=IMATRIX_ARGS)
