"""The block-by-block runner: calibrate a block's static quantizers, run a recipe's algorithm
steps on each decoder block (:class:`lowbit.pipeline.blocks.BlockContext`) and feed the next
block its inputs."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from lowbit.adapters import Adapter, get_adapter
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.modules import QuantMixin
from lowbit.nn.utils import quantizers
from lowbit.pipeline.blocks import BlockContext, _first_tensor, _param_sig
from lowbit.pipeline.capture import (_capture_model_inputs, capture_block_inputs,
                                     chunk_layout)
from lowbit.pipeline.distributed import Collective, current


# --- calibration and the loop -----------------------------------------------------------------
def calibrate_block(ctx: BlockContext) -> int:
    """Calibrate the block's static quantizers that have no statistics yet on its inputs
    (weights in full precision while activations are observed, as in whole-model
    calibration); returns how many. With ``ctx.comm``, the calibrators' states are
    combined over the ranks before the statistics are computed (bit-exact). MoE: every
    token through every expert with ``ctx.moe_all``; else an expert's static input
    quantizer that no token reached takes the largest amax of the other experts of its
    block (:func:`lowbit.pipeline.moe.finish_calibration`, stated in the report)."""
    from lowbit.pipeline.moe import finish_calibration

    todo = [q for _, q in quantizers(ctx.block) if q.needs_calibration and q.amax is None
            and q.is_enabled]
    if not todo:
        return 0
    for q in todo:
        q.start_calibration()
    try:
        with ctx.weights_fp(), ctx.all_experts():
            ctx.run()
        if ctx.comm.enabled:
            for q in todo:
                if q.calibrator is not None:
                    q.calibrator.all_reduce(ctx.comm.group)
        finish_calibration(todo, ctx.block)
    except BaseException:
        for q in todo:
            if q.mode == "calibrating":
                q.calibrator = None
                q.disable()
        raise
    return len(todo)


@contextmanager
def _params_swapped(block: nn.Module, params: dict[str, torch.Tensor] | None):
    """The block's parameters temporarily replaced by ``params`` (None: unchanged)."""
    if not params:
        yield
        return
    saved = {}
    for n, p in block.named_parameters():
        if n in params:
            saved[n] = p.data
            p.data = params[n]
    try:
        yield
    finally:
        for n, p in block.named_parameters():
            if n in saved:
                p.data = saved[n]
        for m in block.modules():
            if isinstance(m, QuantMixin):
                m.invalidate_weight_cache()


def _replace_with_outputs(ctx: BlockContext, fp: bool) -> None:
    """Replace each chunk's hidden states by the block's output, one chunk at a time."""
    qs = [q for _, q in quantizers(ctx.block) if q.is_enabled] if fp else []
    for q in qs:
        q.disable()
    try:
        with torch.no_grad():
            for i, c in enumerate(ctx.chunks):
                ctx._chunk = i
                a, k = ctx.call(c)
                o = _first_tensor(ctx.block(*a, **k))
                ctx.chunks[i] = c.with_hidden(o)
                del a, k, o, c
    finally:
        ctx._chunk = None
        for q in qs:
            q.enable()


Step = Callable[[BlockContext, dict], None]


def process_block(ctx: BlockContext, steps: list[tuple], feed: str = "quantized",
                  last: bool = False) -> dict:
    """One block of the runner: the algorithm ``steps`` (``[(fn, args)]`` or ``[(fn, args,
    targets)]``, in order), then calibration of its static quantizers, then -- unless
    ``last`` -- ``ctx.chunks`` replaced in place by the block's outputs (the next block's
    inputs: quantized, or full precision with ``feed="fp"``). Returns ``ctx.info`` (the
    block's row of the report, with ``seconds``)."""
    t0 = time.perf_counter()
    block = ctx.block
    # feed="fp": the next block gets the outputs of this block's original weights
    # (GPTQ rewrites them), so they are kept aside while the steps run
    original = {n: p.detach().clone() for n, p in block.named_parameters()} \
        if feed == "fp" and steps and not last else None
    if original is not None:
        ctx.fp_feed_sig = _param_sig(block)
    ctx.info["block"] = ctx.name
    # static activation quantizers are calibrated after the steps: off until then
    waiting = [q for _, q in quantizers(block) if q.needs_calibration and
               q.amax is None and q.is_enabled]
    for q in waiting:
        q.disable()
    try:
        from lowbit.pipeline.moe import count_routed

        ctx.routed = count_routed(ctx)  # MoE: routed tokens per expert ({} without experts)
        for step in steps:
            fn, args = step[0], step[1]
            ctx.targets = step[2] if len(step) > 2 else None
            ctx.new_step()
            fn(ctx, dict(args))
            ctx.verify_folds()
    except BaseException:
        ctx.end_memo()
        raise
    finally:
        for q in waiting:
            q.enable()
    ctx.release()
    ctx.info["calibrated"] = calibrate_block(ctx)
    try:
        if not last and feed == "fp" and ctx.fp_outputs is not None:
            # kept by the statistics pass before any weight changed: the original float block
            for i, o in enumerate(ctx.fp_outputs):
                ctx.chunks[i] = ctx.chunks[i].with_hidden(o)
            ctx.info["fp_outputs_from_stats"] = True
        elif not last:
            with _params_swapped(block, original):
                _replace_with_outputs(ctx, fp=feed == "fp")
    finally:
        ctx.fp_outputs = None
        if ctx._memo is not None:
            ctx.info["memo_hits"] = ctx._memo.hits
            ctx.info["memo_peak_mb"] = round(ctx._memo.peak / 2**20, 1)
        ctx.end_memo()
    del original
    if ctx.low_memory:
        ctx.drop_weight_caches()
    ctx.info["seconds"] = round(time.perf_counter() - t0, 3)
    return ctx.info


def run_blocks(model: nn.Module, steps: list[tuple], forward_loop,
               report=None, feed: str = "quantized", chunk_size: int = 8,
               progress: Callable[[int, int, str], None] | None = None,
               adapter: Adapter | None = None, comm: Collective | None = None,
               moe_all: bool = False, moe_min_tokens: int | None = None) -> list[dict]:
    """Run algorithm ``steps`` and calibration block by block; returns one row per block
    (name, seconds, what the steps reported).

    ``steps``: ``[(fn, args)]`` or ``[(fn, args, targets)]``: ``fn(ctx, args)`` is called for
    each block with ``ctx.targets`` set to ``targets`` (name patterns restricting the
    linears the step changes; None: all).

    ``feed``: ``"quantized"`` (default: each block sees the outputs of the quantized blocks
    before it) or ``"fp"`` (full-precision outputs). ``chunk_size``: samples per block call.
    Without decoder blocks (no adapter) the whole model is the single block.

    ``comm``: data-parallel calibration (:mod:`lowbit.pipeline.distributed`; default: the
    initialized process group if any): ``forward_loop`` runs this rank's share of the
    calibration set and the statistics are combined, so every rank ends with the same model.

    ``moe_all`` / ``moe_min_tokens``: MoE calibration (see :class:`BlockContext`; the
    recipe's ``calibrate_all_experts`` and ``moe_min_tokens``).
    """
    if feed not in ("quantized", "fp"):
        raise ConfigError(f"feed must be 'quantized' or 'fp', got {feed!r}")
    if forward_loop is None:
        raise CalibrationError("algorithm steps need calibration data: pass forward_loop= or "
                               "calib_data=")
    comm = comm if comm is not None else current()
    adapter = adapter if adapter is not None else get_adapter(model)
    found = adapter.find_blocks(model) if adapter is not None else None
    if found is None:
        from lowbit.adapters import GENERIC

        adapter = GENERIC
        prefix, blocks = "", [model]
        captured = _capture_model_inputs(model, forward_loop)
    else:
        prefix, blocks = found
        captured = capture_block_inputs(model, blocks, forward_loop, chunk_size)
    chunks = captured.chunks
    del captured.chunks
    layout, offset = chunk_layout(chunks, comm)
    rows = []
    was_training = model.training
    model.eval()
    try:
        for i, block in enumerate(blocks):
            name = f"{prefix}.{i}" if prefix else "(model)"
            ctx = BlockContext(model, block, name, i, adapter, chunks, captured.overrides[i],
                               comm=comm, layout=layout, offset=offset, moe_all=moe_all,
                               moe_min_tokens=moe_min_tokens)
            rows.append(process_block(ctx, steps, feed, last=i == len(blocks) - 1))
            del ctx
            if progress is not None:
                progress(i + 1, len(blocks), name)
    finally:
        model.train(was_training)
        chunks.clear()
    if report is not None:
        report.blocks = rows
    return rows

