"""The algorithm steps a recipe can name: ``smoothquant``, ``awq``, ``gptq``.

Each is ``fn(block, inputs, args, ctx)`` run by :func:`lowbit.pipeline.blocks.run_blocks`
on one decoder block with its captured inputs (``[(args, kwargs)]``).
"""

from __future__ import annotations

import torch

from lowbit.adapters import input_groups, linear_pairs
from lowbit.algorithms.awq_sq import awq_clip, awq_group, smoothquant_group
from lowbit.algorithms.gptq import HessianAccumulator, gptq_quantize_weight
from lowbit.algorithms.smoothing import capture_inputs
from lowbit.errors import ConfigError
from lowbit.nn.modules import QuantMixin
from lowbit.pipeline import blocks as _blocks


def _check_args(name: str, args: dict, allowed: set[str]) -> None:
    bad = set(args) - allowed
    if bad:
        raise ConfigError(f"algorithm {name}: unknown argument {sorted(bad)[0]!r}; expected "
                          f"one of: {', '.join(sorted(allowed))}")


def _groups(block, inputs, ctx, with_pairs: bool):
    a, k = inputs[0]
    groups = [g for g in input_groups(block, a, k) if g.prev is not None]
    if with_pairs:
        groups += linear_pairs(ctx["model"], block)
    return groups


def _inputs_of(block, inputs, names):
    got = capture_inputs(block, names, lambda: _blocks.run_block(block, inputs))
    return {n: torch.cat(v) for n, v in got.items() if v}


def _quantized(block, name) -> bool:
    m = block.get_submodule(name)
    return isinstance(m, QuantMixin) and m.weight_quantizer.is_enabled


def smoothquant_step(block, inputs, args, ctx) -> None:
    """SmoothQuant on every input group whose linears quantize their inputs."""
    _check_args("smoothquant", args, {"alpha", "search", "grid", "linear_pairs"})
    groups = [g for g in _groups(block, inputs, ctx, bool(args.get("linear_pairs", False)))
              if all(isinstance(block.get_submodule(n), QuantMixin) and
                     block.get_submodule(n).input_quantizer.is_enabled for n in g.linears)]
    xs = _inputs_of(block, inputs, [g.linears[0] for g in groups])
    alphas = []
    for g in groups:
        alphas.append(smoothquant_group(block, g, xs[g.linears[0]], args.get("alpha", 0.5),
                                        bool(args.get("search", False)), args.get("grid", 11)))
    ctx["info"]["smoothquant_alpha"] = alphas


def awq_step(block, inputs, args, ctx) -> None:
    """AWQ scale search on every input group (and declared linear pairs), then clipping."""
    _check_args("awq", args, {"grid", "clip", "max_tokens", "clip_grid", "min_ratio"})
    groups = [g for g in _groups(block, inputs, ctx, True)
              if all(_quantized(block, n) for n in g.linears)]
    xs = _inputs_of(block, inputs, [g.linears[0] for g in groups])
    ctx["info"]["awq_alpha"] = [
        awq_group(block, g, xs[g.linears[0]], args.get("grid", 20),
                  args.get("max_tokens", 4096)) for g in groups]
    if args.get("clip", True):
        names = [n for n, m in block.named_modules() if isinstance(m, QuantMixin)
                 and m.weight_quantizer.is_enabled]
        xs = _inputs_of(block, inputs, names)
        ratios = [awq_clip(block.get_submodule(n), xs[n], args.get("clip_grid", 20),
                           args.get("min_ratio", 0.5)) for n in names if n in xs]
        ctx["info"]["awq_clip"] = [r for r in ratios if r is not None]


def gptq_step(block, inputs, args, ctx) -> None:
    """GPTQ of every quantized linear of the block (Hessians from the block's inputs)."""
    _check_args("gptq", args, {"block_size", "percdamp", "act_order", "static_groups",
                               "dtype", "true_sequential"})
    dtype = torch.float64 if args.get("dtype", "float32") == "float64" else torch.float32
    names = [n for n, m in block.named_modules() if isinstance(m, QuantMixin) and
             m.weight_quantizer.is_enabled]
    if args.get("true_sequential", False):
        a, k = inputs[0]
        order = [g.linears for g in input_groups(block, a, k)]
        order = [[n for n in grp if n in names] for grp in order]
    else:
        order = [names]
    losses = []
    for grp in order:
        if not grp:
            continue
        accs = {n: HessianAccumulator(block.get_submodule(n).weight_2d().shape[1], dtype)
                for n in grp}
        hooks = [block.get_submodule(n).register_forward_pre_hook(
            lambda mod, a, n=n: accs[n].add(a[0])) for n in grp]
        wq = [block.get_submodule(n).weight_quantizer for n in grp]
        for q in wq:  # Hessians of the inputs; this group's weights still in FP
            q.disable()
        try:
            _blocks.run_block(block, inputs)
        finally:
            for h in hooks:
                h.remove()
            for q in wq:
                q.enable()
        for n in grp:
            m = block.get_submodule(n)
            r = gptq_quantize_weight(m.weight_2d().detach(), accs[n].H, m.weight_quantizer.spec,
                                     block_size=args.get("block_size", 128),
                                     percdamp=args.get("percdamp", 0.01),
                                     act_order=bool(args.get("act_order", False)),
                                     static_groups=bool(args.get("static_groups", True)))
            with torch.no_grad():
                m.weight.copy_(m.weight_from_2d(r.weight).to(m.weight.dtype))
            m.weight_quantizer.set_fixed_scale(r.scale, r.zero_point, r.global_scale)
            m.invalidate_weight_cache()
            losses.append(r.loss)
    ctx["info"]["gptq_loss"] = sum(losses)


STEPS = {"smoothquant": smoothquant_step, "awq": awq_step, "gptq": gptq_step}
