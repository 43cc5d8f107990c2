"""Dispatch of a recipe's algorithm steps (SmoothQuant, AWQ, GPTQ) to their implementations."""

from __future__ import annotations

from lowbit.errors import ConfigError

_ALGORITHMS: dict = {}


def register_algorithm(name: str, fn) -> None:
    """Register ``fn(model, step, forward_loop, report)`` as algorithm step ``name``."""
    _ALGORITHMS[name] = fn


def run_algorithms(model, recipe, forward_loop, report) -> None:
    """Run the recipe's algorithm steps in order."""
    for step in recipe.algorithms:
        fn = _ALGORITHMS.get(step.name)
        if fn is None:
            raise ConfigError(f"recipe {recipe.name}: unknown algorithm {step.name!r}; "
                              f"expected one of: {', '.join(_ALGORITHMS) or '(none yet)'}")
        fn(model, step, forward_loop, report)
