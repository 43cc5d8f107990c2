"""The registry of algorithm steps a recipe can name, and their dispatch.

A step is registered with :func:`register_algorithm`. Block steps (the default scope) are
``fn(ctx, args)`` with ``ctx`` a :class:`lowbit.pipeline.blocks.BlockContext`: the block
runner calls them for each decoder block in turn, in the order of the recipe, then
calibrates the block. Model steps (``scope="model"``) are ``fn(model, step, forward_loop,
report)`` and run once, before the block steps. The built-in steps (``smoothquant``,
``awq``, ``gptq``) are registered by :mod:`lowbit.algorithms.steps`.
"""

from __future__ import annotations

from typing import Callable

from lowbit.errors import ConfigError

_ALGORITHMS: dict[str, tuple[Callable, str, dict | None]] = {}


def register_algorithm(name: str, fn: Callable, scope: str = "block",
                       args: dict | None = None) -> Callable:
    """Register ``fn`` as the algorithm step ``name`` (``scope``: ``"block"`` or
    ``"model"``, see the module doc); ``args``: the arguments it accepts with their defaults
    (checked before anything runs; None: not checked). Returns ``fn``."""
    if scope not in ("block", "model"):
        raise ConfigError(f"algorithm {name}: scope must be 'block' or 'model', got {scope!r}")
    _ALGORITHMS[name] = (fn, scope, args)
    return fn


def algorithm_args(name: str) -> dict | None:
    """The arguments (with defaults) that step ``name`` accepts."""
    _load_builtins()
    return _ALGORITHMS[name][2] if name in _ALGORITHMS else None


def _load_builtins() -> None:
    import lowbit.algorithms.steps  # noqa: F401  (registers smoothquant, awq, gptq)


def algorithm_names() -> list[str]:
    """Names of the algorithm steps a recipe can use."""
    _load_builtins()
    return list(_ALGORITHMS)


step_names = algorithm_names


def recipe_steps(recipe) -> tuple[list[tuple], list[tuple]]:
    """``(model_steps, block_steps)`` of ``recipe``, checked: ``model_steps`` as ``[(fn,
    step)]``, ``block_steps`` as ``[(fn, args with defaults, targets)]`` for the block
    runner. Unknown steps or arguments: :class:`ConfigError`."""
    _load_builtins()
    for step in recipe.algorithms:
        if step.name not in _ALGORITHMS:
            raise ConfigError(f"recipe {recipe.name}: unknown algorithm {step.name!r}; "
                              f"expected one of: {', '.join(_ALGORITHMS)}")
        allowed = _ALGORITHMS[step.name][2]
        bad = sorted(set(step.args) - set(allowed)) if allowed is not None else []
        if bad:
            raise ConfigError(f"recipe {recipe.name}: algorithm {step.name}: unknown argument "
                              f"{bad[0]!r}; expected one of: {', '.join(sorted(allowed))}")
    model_steps, block_steps = [], []
    for step in recipe.algorithms:
        fn, scope, allowed = _ALGORITHMS[step.name]
        if scope == "model":
            model_steps.append((fn, step))
        else:
            block_steps.append((fn, {**(allowed or {}), **step.args}, step.targets))
    return model_steps, block_steps


def run_algorithms(model, recipe, forward_loop, report, feed: str = "quantized",
                   chunk_size: int = 8, progress=None, comm=None, moe_all: bool = False,
                   moe_min_tokens: int | None = None) -> list[dict]:
    """Run the recipe's algorithm steps: model steps first, then the block steps with the
    block-by-block runner (which also calibrates each block). Returns the runner's rows.
    ``comm``: data-parallel calibration; ``moe_all``/``moe_min_tokens``: MoE calibration
    (see :func:`lowbit.pipeline.blocks.run_blocks`)."""
    from lowbit.pipeline.blocks import run_blocks

    model_steps, block_steps = recipe_steps(recipe)
    for fn, step in model_steps:
        fn(model, step, forward_loop, report)
    if not block_steps:
        return []
    return run_blocks(model, block_steps, forward_loop, report, feed=feed,
                      chunk_size=chunk_size, progress=progress, comm=comm, moe_all=moe_all,
                      moe_min_tokens=moe_min_tokens)
