"""Automatic mixed precision: one candidate format per layer, the least predicted loss
within a bits-per-weight budget.

Effective bits per weight are counted over the searched layers (the linear layers the
candidates quantize; embeddings and the LM head are not searched): the sum of the bits each
layer's weight is stored in (codes, scales, zero-points, NVFP4's per-tensor scale, exactly
as :func:`lowbit.eval.footprint.quantized_weight_bytes`; ``fp16``/``bf16`` layers count 16)
divided by the number of weights. The search assumes the per-layer loss increases of
:func:`lowbit.search.sensitivity` add up, and solves the resulting multiple-choice
knapsack (:func:`lowbit.search.knapsack.solve`).

The result is a plain :class:`~lowbit.config.recipe.Recipe`: one target entry per chosen
format naming its layers, and the candidates' algorithm steps (AWQ, GPTQ, SmoothQuant)
restricted with ``targets`` to the layers that chose them. Save it with
:func:`lowbit.recipes.save`; ``lowbit.quantize(model, lowbit.recipes.load(path),
forward_loop)`` reproduces the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from lowbit.config.recipe import DEFAULT_EXCLUDE, Recipe, match
from lowbit.errors import ConfigError
from lowbit.nn.modules import QuantMixin, quant_class_for
from lowbit.options import accepted_options, reject_unknown
from lowbit.search.candidates import weight_bits
from lowbit.search.knapsack import solve
from lowbit.search.sensitivity import Sensitivity, sensitivity

STEP_ORDER = {"smoothquant": 0, "awq": 1, "gptq": 2}


def _check_target(target_bits: Any) -> float:
    try:
        t = float(target_bits)
    except (TypeError, ValueError):
        raise ConfigError(f"target_bits must be a number of bits per weight, got "
                          f"{target_bits!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"target_bits must be a positive number of bits per weight, got "
                          f"{target_bits!r}")
    return t


def choose(sens: Sensitivity, target_bits: float,
           candidates: Sequence[str] | None = None) -> dict[str, str]:
    """``{layer: candidate}`` with the least total predicted loss whose effective bits per
    weight (over ``sens.layers``) are at most ``target_bits``.

    ``candidates``: restrict to these (default: all of ``sens``). Raises
    :class:`~lowbit.errors.ConfigError` when even the smallest formats exceed the budget.
    """
    t = _check_target(target_bits)
    allowed = list(sens.candidates if candidates is None else candidates)
    unknown = [c for c in allowed if c not in sens.candidates]
    if unknown:
        raise ConfigError(f"candidate {unknown[0]!r} is not in the sensitivity table "
                          f"({', '.join(sens.candidates)})")
    n_weights = sum(sens.numel[n] for n in sens.layers)
    options, costs, values = [], [], []
    for n in sens.layers:
        opts = [c for c in allowed if c in sens.loss[n] and c in sens.bits[n]]
        if not opts:
            raise ConfigError(f"layer {n}: no candidate among {allowed} has a sensitivity")
        options.append(opts)
        costs.append([int(sens.bits[n][c]) for c in opts])
        values.append([float(sens.loss[n][c]) for c in opts])
    budget = int(math.floor(t * n_weights + 1e-6))
    smallest = sum(min(c) for c in costs)
    if smallest > budget:
        raise ConfigError(
            f"target_bits {t:g} cannot be met: the smallest candidates give "
            f"{smallest / n_weights:.4f} bits per weight over the {len(sens.layers)} searched "
            "layers; raise target_bits or add a smaller candidate")
    pick = solve(costs, values, budget)
    return {n: options[i][k] for i, (n, k) in enumerate(zip(sens.layers, pick))}


def effective_bits(sens: Sensitivity, choice: Mapping[str, str]) -> float:
    """Bits per weight of ``choice`` over the searched layers (scales included)."""
    total = sum(sens.bits[n][choice[n]] for n in sens.layers)
    return total / sum(sens.numel[n] for n in sens.layers)


def predicted_loss(sens: Sensitivity, choice: Mapping[str, str]) -> float:
    """Sum of the per-layer loss increases of ``choice`` (nats/token)."""
    return float(sum(sens.loss[n][choice[n]] for n in sens.layers))


def _quantizable_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if quant_class_for(m) is not None or isinstance(m, QuantMixin)]


def _star(name: str, which: str) -> str:
    """``name`` with its numeric parts (``which="all"``) or its last one (``"last"``: the
    expert index of ``...experts.3.down_proj``) replaced by ``*``."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    for i in (digits if which == "all" else digits[-1:]):
        parts[i] = "*"
    return ".".join(parts)


def compress_patterns(chosen: Sequence[str], names: Sequence[str]) -> list[str]:
    """Patterns selecting exactly ``chosen`` among ``names``: ``model.layers.*.mlp.up_proj``
    where every layer of that kind is chosen, else ``model.layers.3.mlp.experts.*.up_proj``
    where every expert of that block's projection is, exact names otherwise."""
    chosen_set = set(chosen)
    left = list(chosen)
    out = []
    for which in ("all", "last"):
        kinds: dict[str, list[str]] = {}
        for n in left:
            kinds.setdefault(_star(n, which), []).append(n)
        done: set[str] = set()
        for key, members in kinds.items():
            if len(members) < 2 or key == members[0]:
                continue
            hit = {n for n in names if match(key, n)}
            if hit == set(members) and hit <= chosen_set:
                out.append(key)
                done.update(members)
        left = [n for n in left if n not in done]
    return out + left


def build_recipe(sens: Sensitivity, choice: Mapping[str, str], model: nn.Module,
                 name: str = "auto", description: str = "") -> Recipe:
    """The recipe applying ``choice`` (``{layer: candidate}``) to ``model``.

    One target entry per (candidate, specs) names its layers; ``fp16``/``bf16`` layers are
    in no entry (left unquantized); each algorithm step of a chosen candidate is kept with
    ``targets`` restricted to that candidate's layers.
    """
    names = _quantizable_names(model)
    targets, steps = [], []
    for cand in sens.candidates:
        recipe = sens.recipes.get(cand)
        layers = [m for n in sens.layers if choice.get(n) == cand for m in sens.members(n)]
        if recipe is None or not layers:
            continue
        by_spec: dict[tuple, list[str]] = {}
        for n in layers:
            specs, _ = recipe.specs_for(n)
            key = tuple(None if s is None else s.model_dump_json(exclude_defaults=True)
                        for s in specs.values())
            by_spec.setdefault(key, []).append(n)
        for members in by_spec.values():
            specs, _ = recipe.specs_for(members[0])
            t = {"pattern": compress_patterns(members, names)}
            for role, s in specs.items():
                t[role] = None if s is None else s.model_dump(exclude_defaults=True)
            targets.append(t)
        for i, step in enumerate(recipe.algorithms):
            sel = [n for n in layers if not step.targets or any(match(p, n)
                                                                 for p in step.targets)]
            if sel:
                steps.append((STEP_ORDER.get(step.name, 9), len(steps),
                              {"name": step.name, "args": dict(step.args),
                               "targets": compress_patterns(sel, names)}))
    chosen = [m for n in sens.layers if sens.recipes.get(choice.get(n)) is not None
              for m in sens.members(n)]
    exclude = [p for p in DEFAULT_EXCLUDE if not any(match(p, n) for n in chosen)]
    d = {"name": name, "description": description, "targets": targets, "exclude": exclude,
         "algorithms": [s for _, _, s in sorted(steps, key=lambda s: s[:2])],
         "group_policy": "fallback"}
    return Recipe.parse(d, f"recipe {name}")


#: the keyword arguments :func:`auto_recipe` passes on to :func:`sensitivity`
SENSITIVITY_ARGS = tuple(accepted_options(sensitivity, ("model", "candidates", "forward_loop")))


def auto_recipe(model: nn.Module, candidates: "Sequence[Any] | Mapping[str, Any]",
                target_bits: float, forward_loop: Callable[[nn.Module], Any] | None = None,
                *, sens: Sensitivity | None = None, name: str | None = None,
                **sensitivity_args: Any) -> tuple[Recipe, dict]:
    """The recipe of least predicted loss at ``target_bits`` bits per weight, and a report.

    Args:
        model: the unquantized model (not modified).
        candidates: as :func:`lowbit.search.sensitivity` (e.g. ``["bf16",
            "int8-weight-only", "int4-awq", "nvfp4-weight-only"]``).
        target_bits: the budget, bits per weight over the searched layers, scales included
            (e.g. ``5.0``).
        forward_loop: calibration batches (token ids); not needed when ``sens`` is given.
        sens: a sensitivity table computed before (e.g. to try several budgets).
        name: the recipe's name (default ``auto-<target_bits>``).
        **sensitivity_args: passed to :func:`lowbit.search.sensitivity` (``method``,
            ``group_size``, ``check``, ``progress``...); a name it does not take is a
            ConfigError naming it.

    Returns:
        ``(recipe, report)``; report keys: ``target_bits``, ``effective_bits``,
        ``params`` (searched weights), ``layers`` (searched units), ``groups`` (MoE: unit
        ``<experts>.*.<role>`` -> its expert linears), ``predicted_loss_increase`` (nats/token),
        ``base_loss``, ``method``, ``counts`` and ``weight_share`` per candidate, ``choice``
        (``{layer: candidate}``), ``uniform`` (bits and predicted loss of each candidate used
        everywhere it can be), ``rank_correlation`` (of the measured check, if any).
    """
    t = _check_target(target_bits)
    reject_unknown({k: v for k, v in sensitivity_args.items() if k not in SENSITIVITY_ARGS},
                   "auto_recipe", ["sens", "name", *SENSITIVITY_ARGS])
    if sens is None:
        sens = sensitivity(model, candidates, forward_loop, **sensitivity_args)
    elif sensitivity_args:
        raise ConfigError(f"sensitivity arguments {sorted(sensitivity_args)} are not used "
                          "when sens= is given")
    choice = choose(sens, t)
    eff = effective_bits(sens, choice)
    n_weights = sum(sens.numel[n] for n in sens.layers)
    counts = {c: sum(1 for n in sens.layers if choice[n] == c) for c in sens.candidates}
    share = {c: sum(sens.numel[n] for n in sens.layers if choice[n] == c) / n_weights
             for c in sens.candidates}
    uniform = {}
    for c in sens.candidates:
        ch = {n: (c if c in sens.loss[n] else choice[n]) for n in sens.layers}
        uniform[c] = {"bits": effective_bits(sens, ch), "predicted": predicted_loss(sens, ch)}
    label = f"{t:g}"
    desc = (f"automatic mix at {eff:.3f} bits per weight (budget {label}) of "
            f"{', '.join(c for c in sens.candidates if counts[c])}; per-layer sensitivity: "
            f"{sens.method}")
    recipe = build_recipe(sens, choice, model, name or f"auto-{label}", desc)
    report = {"target_bits": t, "effective_bits": eff, "params": n_weights,
              "layers": len(sens.layers), "predicted_loss_increase": predicted_loss(sens, choice),
              "base_loss": sens.base_loss, "method": sens.method,
              "counts": {c: k for c, k in counts.items() if k},
              "weight_share": {c: s for c, s in share.items() if s},
              "choice": dict(choice), "uniform": uniform, "groups": dict(sens.groups),
              "rank_correlation": sens.rank_correlation() if sens.measured else None,
              "float_bits": next((sens.bits[n][c] / sens.numel[n] for n in sens.layers[:1]
                                  for c in sens.candidates if sens.recipes.get(c) is None
                                  and c in sens.bits[n]), 16.0)}
    return recipe, report


def auto_quantize(model: nn.Module, candidates: "Sequence[Any] | Mapping[str, Any]",
                  target_bits: float, forward_loop: Callable[[nn.Module], Any] | None = None,
                  **kwargs: Any) -> tuple[nn.Module, Recipe]:
    """Choose a format per layer (:func:`auto_recipe`) and quantize ``model`` in place with
    it (:func:`lowbit.quantize`); returns ``(model, recipe)``. ``kwargs`` are
    :func:`auto_recipe`'s (``sens``, ``name``, the sensitivity arguments); others raise
    ConfigError.

    The report of :func:`auto_recipe` is ``model.lowbit_auto_report``, with
    ``actual_bits`` (the bits per weight of the searched layers, read back from the
    quantized model) added.
    """
    from lowbit.pipeline import quantize

    recipe, report = auto_recipe(model, candidates, target_bits, forward_loop, **kwargs)
    quantize(model, recipe, forward_loop)
    mods = dict(model.named_modules())
    groups = report.get("groups", {})
    total = 0
    for n in report["choice"]:
        for name in groups.get(n, [n]):
            m = mods[name]
            total += weight_bits(m) if isinstance(m, QuantMixin) and \
                m.weight_quantizer.is_enabled else m.weight.numel() * report["float_bits"]
    report["actual_bits"] = total / report["params"]
    model.lowbit_auto_report = report
    return model, recipe
