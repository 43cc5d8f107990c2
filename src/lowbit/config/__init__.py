"""Configuration models: :class:`QuantSpec` (one tensor) and :class:`Recipe` (a model)."""

from lowbit.config.recipe import AlgorithmStep, Recipe, Target, match
from lowbit.core.spec import QuantSpec

__all__ = ["AlgorithmStep", "QuantSpec", "Recipe", "Target", "match"]
