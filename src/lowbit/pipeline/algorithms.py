"""Dispatch of a recipe's algorithm steps to the block-by-block runner."""

from __future__ import annotations

from lowbit.errors import ConfigError


def step_names() -> list[str]:
    """Names of the algorithm steps a recipe can use."""
    from lowbit.pipeline.steps import STEPS

    return list(STEPS)


def run_algorithms(model, recipe, forward_loop, report, feed: str = "quantized",
                   progress=None) -> None:
    """Run the recipe's algorithm steps in order, block by block (then block calibration)."""
    from lowbit.pipeline.blocks import run_blocks
    from lowbit.pipeline.steps import STEPS

    steps = []
    for step in recipe.algorithms:
        if step.name not in STEPS:
            raise ConfigError(f"recipe {recipe.name}: unknown algorithm {step.name!r}; "
                              f"expected one of: {', '.join(STEPS)}")
        steps.append((STEPS[step.name], dict(step.args)))
    run_blocks(model, steps, forward_loop, report, feed=feed, progress=progress)
