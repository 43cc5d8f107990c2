"""The block-by-block runner: algorithms and calibration one decoder block at a time.

1. Capture the inputs of the first block: the calibration batches run through the model
   until block 0, where a pre-hook stores its arguments and stops the forward pass.
2. For each block: run the recipe's algorithm steps on it with the captured inputs, calibrate
   its static quantizers on the same inputs, and compute its (quantized, or FP with
   ``feed="fp"``) outputs, which become the next block's inputs.

Only one block's inputs and outputs are alive at a time. No FX tracing: plain hooks.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from lowbit.adapters import find_blocks
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.utils import quantizers


class _Stop(Exception):
    pass


def capture_first_block_inputs(model: nn.Module, block: nn.Module,
                               forward_loop: Callable[[nn.Module], Any]) -> list:
    """``[(args, kwargs)]`` of ``block`` for each forward pass made by ``forward_loop``."""
    got = []

    def hook(mod, args, kwargs):
        kwargs = dict(kwargs)
        for k in ("past_key_values", "past_key_value", "layer_past"):
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        got.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), kwargs))
        raise _Stop

    orig = model.forward

    def forward(*a, **k):
        try:
            return orig(*a, **k)
        except _Stop:
            return None

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    model.forward = forward
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        h.remove()
        del model.forward
    if not got:
        raise CalibrationError("the forward loop never reached the first decoder block")
    return got


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def run_block(block: nn.Module, inputs: list) -> list[torch.Tensor]:
    """Outputs (hidden states) of ``block`` for each captured ``(args, kwargs)``."""
    outs = []
    with torch.no_grad():
        for a, k in inputs:
            o = block(*a, **k)
            outs.append(o[0] if isinstance(o, (tuple, list)) else o)
    return outs


def calibrate_block(block: nn.Module, inputs: list) -> int:
    """Calibrate the static quantizers of ``block`` that have no statistics yet."""
    todo = [q for _, q in quantizers(block) if q.needs_calibration and q.amax is None and
            q.mode != "disabled"]
    if not todo:
        return 0
    for q in todo:
        q.start_calibration()
    weights = [q for _, q in quantizers(block) if q.role == "weight" and q.is_enabled]
    for q in weights:
        q.disable()
    try:
        run_block(block, inputs)
        for q in todo:
            q.finish_calibration()
    finally:
        for q in weights:
            q.enable()
    return len(todo)


def run_blocks(model: nn.Module, steps: list, forward_loop, report=None, feed: str = "quantized",
               progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Run algorithm ``steps`` (``[(fn, args)]``, ``fn(block, inputs, args, ctx)``) and
    calibration block by block; returns one timing/info row per block."""
    if feed not in ("quantized", "fp"):
        raise ConfigError(f"feed must be 'quantized' or 'fp', got {feed!r}")
    found = find_blocks(model)
    if found is None:
        raise ConfigError("algorithm steps need a model with decoder blocks (an nn.ModuleList "
                          "of identical blocks); none was found")
    prefix, blocks = found
    if forward_loop is None:
        raise CalibrationError("algorithm steps need calibration data: pass forward_loop= or "
                               "calib_data=")
    inputs = capture_first_block_inputs(model, blocks[0], forward_loop)
    rows = []
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        info = {"block": f"{prefix}.{i}"}
        ctx = {"model": model, "name": f"{prefix}.{i}", "index": i, "info": info}
        # static activation quantizers are calibrated after the steps: pass-through until then
        waiting = [q for _, q in quantizers(block) if q.needs_calibration and q.amax is None
                   and q.mode == "quantizing"]
        for q in waiting:
            q.disable()
        try:
            for fn, args in steps:
                fn(block, inputs, args, ctx)
        finally:
            for q in waiting:
                q.enable()
        calibrate_block(block, inputs)
        if feed == "fp":
            qs = [q for _, q in quantizers(block) if q.is_enabled]
            for q in qs:
                q.disable()
            outs = run_block(block, inputs)
            for q in qs:
                q.enable()
        else:
            outs = run_block(block, inputs)
        inputs = [_with_hidden(a, k, o) for (a, k), o in zip(inputs, outs)]
        del outs
        info["seconds"] = time.perf_counter() - t0
        rows.append(info)
        if progress is not None:
            progress(i + 1, len(blocks), info["block"])
    if report is not None:
        report.blocks = rows
    return rows
