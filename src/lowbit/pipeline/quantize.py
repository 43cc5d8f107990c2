"""``lowbit.quantize(model, recipe, forward_loop)``: the main entry point of PTQ.

1. insert quantizers per the recipe (modules change class in place, nothing is copied;
   the stacked 3-D experts of MoE blocks first become one linear MLP per expert,
   :mod:`lowbit.adapters.experts`);
2. run the recipe's algorithm steps (SmoothQuant, AWQ, GPTQ...) when it has any;
3. calibrate the static activation and KV-cache quantizers by running ``forward_loop``;
4. return the same model, now fake-quantized.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from lowbit import recipes as _recipes
from lowbit.config.recipe import Recipe
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.swap import apply_recipe
from lowbit.nn.utils import quantizers


def _forward_loop_from(calib_data: Any) -> Callable[[nn.Module], None]:
    from lowbit.data.text import forward_loop_from_batches

    if isinstance(calib_data, torch.Tensor) and calib_data.dim() == 1:
        calib_data = calib_data.unsqueeze(0)
    return forward_loop_from_batches(calib_data)


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], Any], comm=None,
              calibrate_all_experts: bool = False, released: list | None = None) -> int:
    """Run ``forward_loop(model)`` with every static quantizer observing; returns how many
    quantizers were calibrated. Weights stay in full precision while activations are observed.

    ``comm`` (default: the initialized ``torch.distributed`` group, if any): each rank's
    ``forward_loop`` runs its share of the data and the calibrators are combined (bit-exact,
    see :mod:`lowbit.pipeline.distributed`).

    MoE experts (:mod:`lowbit.pipeline.moe`): the tokens routed to each expert are counted
    (``routed_tokens``); ``calibrate_all_experts``: every token also passes through every
    expert (statistics only); else an expert's static input quantizer that no token reached
    takes the largest amax of the other experts of its block (stated in the report).

    Towers the model's adapter declares unreached by text calibration
    (:func:`lowbit.adapters.facts.unreached_modules`, e.g. Gemma-3's vision tower): a module
    there whose static quantizers saw no data goes back to float instead of raising
    (:mod:`lowbit.pipeline.unreached`); one row per such module is appended to ``released``.
    A quantizer anywhere else that saw no data is a :class:`CalibrationError`.
    """
    from lowbit.pipeline import unreached
    from lowbit.pipeline.distributed import current
    from lowbit.pipeline.moe import all_experts, experts_modules, finish_calibration, tracking

    comm = comm if comm is not None else current()
    todo = [q for _, q in quantizers(model) if q.needs_calibration and q.mode != "disabled"
            and q.amax is None]
    if not todo:
        return 0
    saved = {}
    for name, q in quantizers(model):
        if q.role == "weight" and q.is_enabled:
            saved[name] = q
            q.disable()
    for q in todo:
        q.start_calibration()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tracking(model), all_experts(model, calibrate_all_experts):
            forward_loop(model)
        if comm.enabled:
            for q in todo:
                if q.calibrator is not None:
                    q.calibrator.all_reduce(comm.group)
            for m in experts_modules(model).values():
                comm.sum_(m.routed_tokens)
        spare = unreached.starving(model, todo)
        finish_calibration([q for q in todo if id(q) not in spare], model)
        rows = unreached.release(model, spare)
        if released is not None:
            released.extend(rows)
    finally:
        for q in saved.values():
            q.enable()
        for q in todo:
            if q.mode == "calibrating":  # failed half-way: leave it disabled, not half-made
                q.calibrator = None
                q.disable()
        model.train(was_training)
    return len(todo)


def quantize(model: nn.Module, recipe: "str | Recipe | dict",
             forward_loop: Callable[[nn.Module], Any] | None = None,
             calib_data: Any = None, progress: Callable[[int, int, str], None] | None = None,
             feed: str | None = None, chunk_size: int = 8, blockwise: bool | None = None,
             comm=None, **overrides: Any) -> nn.Module:
    """Quantize ``model`` in place per ``recipe`` and return it.

    Args:
        model: any ``nn.Module`` (transformers models included), float32/float16/bfloat16.
        recipe: a preset name (``lowbit.recipes.names()``), a YAML path, a dict or a Recipe.
        forward_loop: ``callable(model)`` running the calibration data through the model;
            needed when the recipe has static activation or KV-cache quantizers or
            data-driven algorithms. Weight-only recipes need no data.
        calib_data: instead of ``forward_loop``: token ids ``LongTensor [n, seq]`` (or a list
            of batches / dicts of model inputs) run in batches of 1.
        progress: ``callable(done, total, block_name)`` called after each decoder block when
            the recipe has algorithm steps (they run block by block).
        feed: block by block, each block's inputs are the outputs of the quantized blocks
            before it (``"quantized"``) or of the full-precision ones (``"fp"``); None: the
            recipe's ``feed`` (e.g. ``int8-smoothquant`` says ``fp``), else ``"quantized"``.
        chunk_size: calibration samples per block call in the block-by-block runner.
        blockwise: run calibration block by block (``lowbit.pipeline.blocks``): None (the
            default) does so when the recipe has algorithm steps, True always, False never
            (then algorithm steps are an error).
        comm: data-parallel calibration (a :class:`lowbit.pipeline.distributed.Collective`;
            default: the initialized ``torch.distributed`` group when it has several ranks,
            e.g. under ``torchrun`` after :func:`lowbit.pipeline.distributed.init_from_env`).
            ``calib_data`` is then the whole set on every rank (each takes its share), a
            ``forward_loop`` runs this rank's share only; every rank ends with the same
            model. See :mod:`lowbit.pipeline.distributed` for what is exact.
        **overrides: recipe overrides (``group_size=64``, ``kv_cache="fp8"``...), and the
            recipe's MoE options ``moe_calibrate_all_experts`` (True/False: every token also
            through every expert in calibration passes; default: on when the recipe has
            algorithm steps) and ``moe_min_tokens`` (an expert routed fewer calibration
            tokens is named in the report with its fallback; default: its input width).

    The report of what was done is in ``model.lowbit_report`` (quantized and excluded
    modules, MoE routers left in float, group-size fallbacks, KV-cache attachment, times,
    ``gguf_mix`` (a recipe's llama-quantize mix, :class:`lowbit.config.recipe.GgufMix`:
    the plan of :func:`lowbit.adapters.gguf_mix.plan` as a dict: ``ftype``, ``modules``
    ``{module: {tensor, type, why}}``, ``token_embd`` and ``output`` types for the GGUF
    exporter, ``float_modules`` kept in float because no block type fits, ``fallbacks``;
    None without a mix), ``experts`` (MoE: tokens routed to each expert in calibration and the fallback of each
    expert under ``moe_min_tokens``, :mod:`lowbit.pipeline.moe`), ``unreached`` (towers
    the adapter declares text calibration never runs, e.g. Gemma-3's vision tower: what
    happened to each, :mod:`lowbit.pipeline.unreached`) and ``coverage``: the
    quantized share of the weights and why every other weight parameter is not
    (:func:`lowbit.print_summary` prints it). Warnings (ConfigError with
    ``strict: true`` in the recipe): a recipe targeting every linear that leaves more than 2%
    of the non-embedding weights with no quantized class; recipe group sizes that fell back
    (one line for all layers). A ``group_size`` override that does not divide a layer's
    width is a ConfigError naming the layer and the sizes that would work.
    """
    from lowbit.pipeline.distributed import current, shard_batches

    t0 = time.perf_counter()
    comm = comm if comm is not None else current()
    from lowbit.pipeline.moe import expert_rows, experts_modules, moe_report, split_overrides

    overrides, moe_options = split_overrides(overrides)
    recipe = _recipes.load(recipe, **overrides)
    if moe_options:
        recipe = Recipe.parse({**recipe.to_dict(), **moe_options}, f"recipe {recipe.name}")
    moe_all = recipe.calibrate_all_experts
    feed = feed if feed is not None else (recipe.feed or "quantized")
    if forward_loop is None and calib_data is not None:
        if comm.enabled:
            calib_data = shard_batches(calib_data, chunk_size, comm)
        forward_loop = _forward_loop_from(calib_data)
    from lowbit.adapters.experts import unfuse_experts

    unfused = unfuse_experts(model)
    mix_plan = None
    if recipe.gguf_mix is not None:  # llama-quantize's mix -> one gguf_* spec per linear
        from lowbit.adapters.gguf_mix import expand

        recipe, mix_plan = expand(model, recipe)
        if mix_plan.fallbacks or mix_plan.float_modules:
            import warnings

            first = next(iter(mix_plan.fallbacks.items()))
            warnings.warn(
                f"recipe {recipe.name}: {len(mix_plan.fallbacks)} layers took llama.cpp's "
                f"type fallback (e.g. {first[0]}: {first[1]})"
                + (f"; {len(mix_plan.float_modules)} stay float (no block type fits)"
                   if mix_plan.float_modules else "")
                + " (all in model.lowbit_report.gguf_mix)", stacklevel=2)
    report = apply_recipe(model, recipe)
    report.unfused_experts = unfused
    from lowbit.pipeline.unreached import kv_outside_decoder

    kv_outside_decoder(model, report)
    moe = bool(experts_modules(model))
    if moe:
        report = moe_report(report)
    if blockwise is False and recipe.algorithms:
        raise ConfigError(f"recipe {recipe.name} has algorithm steps, which run block by "
                          "block: blockwise=False is not possible")
    if recipe.algorithms:
        from lowbit.pipeline.algorithms import run_algorithms

        run_algorithms(model, recipe, forward_loop, report, feed=feed, chunk_size=chunk_size,
                       progress=progress, comm=comm, moe_all=moe_all,
                       moe_min_tokens=recipe.moe_min_tokens)
    elif blockwise and any(q.needs_calibration and q.amax is None and q.is_enabled
                           for _, q in quantizers(model)):
        from lowbit.pipeline.blocks import run_blocks

        run_blocks(model, [], forward_loop, report, feed=feed, chunk_size=chunk_size,
                   progress=progress, comm=comm, moe_all=moe_all,
                   moe_min_tokens=recipe.moe_min_tokens)
    if getattr(report, "blocks", None):  # the block runner ran: say how it fed the blocks
        report.feed = feed
    needs = any(q.needs_calibration and q.amax is None for _, q in quantizers(model))
    released: list[dict] = []
    if needs:
        if forward_loop is None:
            raise CalibrationError(
                f"recipe {recipe.name} has static activation quantizers: pass forward_loop= "
                "or calib_data= (or use a dynamic or weight-only recipe)"
            )
        calibrate(model, forward_loop, comm, calibrate_all_experts=moe_all, released=released)
    from lowbit.pipeline.unreached import update_report

    update_report(model, report, recipe, released)
    if moe:
        report.experts = expert_rows(model, moe_all, recipe.moe_min_tokens)
    report.seconds = time.perf_counter() - t0
    report.gguf_mix = None if mix_plan is None else mix_plan.as_dict()
    model.lowbit_report = report
    model.lowbit_recipe = recipe
    return model
