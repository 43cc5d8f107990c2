"""Apply a recipe to a model: swap modules in place, resolve group sizes, attach KV quantizers.

Nothing is copied: supported modules change class in place (see :mod:`lowbit.nn.modules`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from lowbit.config.recipe import Recipe
from lowbit.core import QuantSpec
from lowbit.errors import ConfigError
from lowbit.nn.kv_cache import attach_kv_quantizers
from lowbit.nn.modules import QuantMixin, quant_class_for, quantize_module


@dataclass
class ApplyReport:
    """What :func:`apply_recipe` did: quantized and excluded modules, group fallbacks..."""

    quantized: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # human-readable notes
    kv_cache: list[tuple[str, str]] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)


def _resolve_group(spec: QuantSpec | None, in_features: int, name: str, recipe: Recipe,
                   report: ApplyReport) -> QuantSpec | None:
    if spec is None or spec.granularity != "group" or spec.block_format is not None:
        if spec is not None and spec.block_format is not None and \
                in_features % spec.group_size:
            raise ConfigError(f"layer {name}: input width {in_features} is not a multiple of "
                              f"{spec.format}'s block size {spec.group_size}")
        return spec
    g = spec.group_size
    if in_features % g == 0:
        return spec
    if recipe.group_policy == "strict":
        raise ConfigError(
            f"layer {name}: input width {in_features} is not a multiple of group size {g}; "
            f"use a group size that divides it or group_policy: fallback"
        )
    new = max(d for d in range(1, g + 1) if in_features % d == 0)
    report.fallbacks.append(f"{name}: group {g} -> {new} ({in_features} % {g} != 0)")
    return spec.model_copy(update={"group_size": new})


def apply_recipe(model: nn.Module, recipe: Recipe) -> ApplyReport:
    """Insert quantizers into ``model`` per ``recipe`` (in place); returns a report.

    Supported modules (Linear, Conv1d, Conv2d, GPT-2 Conv1D) that match a target and are not
    excluded become quantized. A target pattern that matches no module is a warning (an
    error with ``strict: true``).
    """
    report = ApplyReport()
    used: set[int] = set()
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantMixin):
            raise ConfigError(f"module {name} is already quantized; start from the "
                              "unquantized model")
        if quant_class_for(m) is None:
            continue
        specs, hits = recipe.specs_for(name)
        if not hits:
            continue
        if recipe.is_excluded(name):
            report.excluded.append(name)
            used.update(hits)
            continue
        used.update(hits)
        if all(s is None for s in specs.values()):
            continue
        cls = quant_class_for(m)
        in_features = m.weight.shape[0] if cls.weight_transposed else m.weight[0].numel()
        weight = _resolve_group(specs["weight"], in_features, name, recipe, report)
        inp = _resolve_group(specs["input"], in_features, name + " (input)", recipe, report)
        n_notes = len(report.fallbacks)
        quantize_module(m, weight, inp, specs["output"], name)
        if weight is not specs["weight"]:
            m.weight_quantizer.note = report.fallbacks[n_notes - 1 - (inp is not specs["input"])]
        report.quantized.append(name)
    for i, t in enumerate(recipe.targets):
        if i not in used:
            report.unmatched_patterns.extend(t.patterns)
    if report.unmatched_patterns:
        msg = (f"recipe {recipe.name}: pattern(s) {report.unmatched_patterns} match no "
               "quantizable module")
        if recipe.strict:
            raise ConfigError(msg)
        warnings.warn(msg, stacklevel=2)
    if recipe.kv_cache is not None:
        report.kv_cache = attach_kv_quantizers(model, recipe.kv_cache)
        if not report.kv_cache:
            msg = f"recipe {recipe.name}: kv_cache is set but no attention module was found"
            if recipe.strict:
                raise ConfigError(msg)
            warnings.warn(msg, stacklevel=2)
    return report
