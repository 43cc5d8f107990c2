"""Apply a recipe to a model: swap modules in place, resolve group sizes, attach KV quantizers.

Nothing is copied: supported modules change class in place (see :mod:`lowbit.nn.modules`).
Everything is decided before the first module changes, so an error leaves the model as it
was. Nothing is skipped without a word: the report's :class:`~lowbit.nn.coverage.Coverage`
gives the quantized share of the weights and the reason for every parameter left in float.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from lowbit.config.recipe import Recipe
from lowbit.core import QuantSpec
from lowbit.errors import ConfigError
from lowbit.nn.coverage import Coverage, weight_coverage
from lowbit.nn.kv_cache import attach_kv_quantizers
from lowbit.nn.modules import QuantMixin, quant_class_for, quantize_module
from lowbit.nn.routers import find_routers

GROUP_SIZE_MAX = 256  # divisors up to this size are offered when a group size does not fit
NAMED_IN_WARNING = 3  # layers named in the one-line group-fallback warning


@dataclass
class ApplyReport:
    """What :func:`apply_recipe` did.

    ``quantized``/``excluded``: module names (``excluded``: by a recipe pattern);
    ``routers``: MoE routers left in float by the default exclusion
    (:mod:`lowbit.nn.routers`); ``fallbacks``: one note per layer whose recipe group size
    did not divide its width (``"name: group 128 -> 96 (576 % 128 != 0)"``), every layer;
    ``kv_cache``: attached KV quantizers; ``unfused_experts``: MoE experts modules split
    into one linear MLP per expert before the swap (set by the pipeline,
    :mod:`lowbit.adapters.experts`); ``unmatched_patterns``: target patterns that
    matched nothing; ``coverage``: the quantized share of the weights and why the rest is
    not (:class:`~lowbit.nn.coverage.Coverage`).
    """

    quantized: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # human-readable notes
    kv_cache: list[tuple[str, str]] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    coverage: Coverage | None = None
    unfused_experts: list[str] = field(default_factory=list)
    gguf_mix: dict | None = None  # a recipe's GGUF mix plan (lowbit.adapters.gguf_mix)
    rotations: dict | None = None  # what a rotate/spinquant step did (lowbit.algorithms.rotate)
    feed: str | None = None  # the block runner's feed ("quantized" / "fp"); None: not blockwise

    def lines(self) -> list[str]:
        """Short lines for a console: the coverage line, each unquantized parameter above
        0.5% of the weights with its reason, the group-fallback line, and the notes of the
        algorithm steps (an AWQ block put back by its guard)."""
        out = []
        if self.coverage is not None:
            c = self.coverage
            out.append(c.line())
            for u in c.listed():
                out.append(f"not quantized: {u.name} {list(u.shape)} "
                           f"({u.numel / c.total:.1%}): {u.reason}")
        if self.fallbacks:
            out.append(fallback_line(self.fallbacks))
        if self.gguf_mix:
            g = self.gguf_mix
            kinds = Counter(r["type"] for r in g.get("modules", {}).values())
            out.append(f"GGUF mix {g['ftype']}: " + ", ".join(f"{n} {t}" for t, n in
                                                               sorted(kinds.items()))
                       + f"; token_embd {g.get('token_embd')}, output {g.get('output')}"
                       + (f"; {len(g['fallbacks'])} tensors took llama.cpp's fallback type "
                          "(width not a multiple of the block)" if g.get("fallbacks") else ""))
        if self.rotations:
            r = self.rotations
            on = ", ".join(f"{k} {r['kinds'][k]} {r['sizes'][k]}" for k in r.get("sizes", {}))
            online = ", ".join(f"{n} {w}" for w, n in r.get("online", {}).items() if n)
            out.append(f"rotations: {on or 'none'}; online: {online or 'none'}"
                       + ("; LM head untied from the embedding" if r.get("untied_lm_head")
                          else "") + (" (learned: spinquant)" if r.get("learned") else ""))
        blocks = getattr(self, "blocks", None) or []  # set by the block runner
        if self.feed is not None and blocks:
            memo = max((r.get("memo_peak_mb", 0) for r in blocks if isinstance(r, dict)),
                       default=0)
            out.append(f"blocks: {len(blocks)}, each fed the "
                       + ("float model's outputs (feed fp)" if self.feed == "fp" else
                          "quantized blocks' outputs (feed quantized)")
                       + (f"; reused outputs held up to {memo:g} MiB per block" if memo else ""))
        for row in blocks:
            out.extend(row.get("notes", []) if isinstance(row, dict) else [])
        return out


def divisors(width: int, limit: int = GROUP_SIZE_MAX) -> list[int]:
    """Group sizes ``<= limit`` that divide ``width`` (ascending)."""
    return [d for d in range(1, min(width, limit) + 1) if width % d == 0]


def fallback_line(notes: list[str]) -> str:
    """One line naming the first few group-size fallbacks and how many there are."""
    shown = "; ".join(notes[:NAMED_IN_WARNING])
    more = f"; and {len(notes) - NAMED_IN_WARNING} more" if len(notes) > NAMED_IN_WARNING \
        else ""
    return (f"group size fallback in {len(notes)} layer(s) whose width the group size does "
            f"not divide (the largest divisor below it is used): {shown}{more} "
            "(all in model.lowbit_report.fallbacks)")


def _resolve_group(spec: QuantSpec | None, in_features: int, name: str, recipe: Recipe,
                   notes: list[str], bad: list[tuple[str, int, int]]) -> QuantSpec | None:
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
        bad.append((name, in_features, g))
        return spec
    new = max(d for d in range(1, g + 1) if in_features % d == 0)
    notes.append(f"{name}: group {g} -> {new} ({in_features} % {g} != 0)")
    return spec.model_copy(update={"group_size": new})


def _group_error(bad: list[tuple[str, int, int]]) -> ConfigError:
    name, width, g = bad[0]
    msg = (f"layer {name}: input width {width} is not a multiple of group size {g}; group "
           f"sizes <= {GROUP_SIZE_MAX} that divide it: "
           f"{', '.join(map(str, divisors(width)))}")
    if len(bad) > 1:
        common = set(divisors(width))
        for _, w, _ in bad[1:]:
            common &= set(divisors(w))
        msg += (f"; {len(bad) - 1} more layer(s) fail too ({', '.join(b[0] for b in bad[1:3])}"
                f"{', ...' if len(bad) > 3 else ''}); sizes that divide every one of them: "
                f"{', '.join(map(str, sorted(common)))}")
    return ConfigError(msg + "; or use group_policy: fallback (the largest divisor per layer)")


def _linear_like(m: nn.Module) -> bool:
    """nn.Linear and its subclasses, and supported non-conv modules (GPT-2 Conv1D)."""
    return isinstance(m, nn.Linear) or (
        quant_class_for(m) is not None and not isinstance(m, (nn.Conv1d, nn.Conv2d)))


def _with_mha_parents(model: nn.Module, plan: list) -> list:
    """``plan`` plus, for a planned ``out_proj`` whose ``nn.MultiheadAttention`` is not planned
    (excluded, or no spec for it), that attention module with no specs: torch's own forward
    reads ``out_proj.weight`` directly, so only the quantized forward makes the out_proj's
    quantizers apply (its ``in_proj_weight`` stays float, as the recipe said). An out_proj
    of an attention module lowbit cannot swap (kdim/vdim...) is a ConfigError."""
    planned = {p[0] for p in plan}
    mods = dict(model.named_modules())
    extra: dict[str, tuple] = {}
    for name in planned:
        parent, _, leaf = name.rpartition(".")
        pm = mods[parent]
        if leaf != "out_proj" or not isinstance(pm, nn.MultiheadAttention):
            continue
        if quant_class_for(pm) is None:
            from lowbit.nn.mha import QuantMultiheadAttention

            raise ConfigError(
                f"layer {name}: the out_proj of nn.MultiheadAttention {parent or '(root)'} "
                f"cannot be quantized: torch's forward reads its weight directly and the "
                f"module has {QuantMultiheadAttention.unsupported(pm)}; exclude "
                f"'{parent}*' in the recipe")
        if parent not in planned:
            extra[parent] = (parent, pm, None, None, None, "")
    return list(extra.values()) + plan


def _warn_or_raise(msg: str, strict: bool) -> None:
    if strict:
        raise ConfigError(msg)
    warnings.warn(msg, stacklevel=3)


def apply_recipe(model: nn.Module, recipe: Recipe) -> ApplyReport:
    """Insert quantizers into ``model`` per ``recipe`` (in place); returns a report.

    Supported modules (Linear and its subclasses that keep Linear's forward, Conv1d, Conv2d,
    GPT-2 Conv1D, ``nn.MultiheadAttention``: :mod:`lowbit.nn.mha`) that match a target and
    are not excluded become quantized; an ``nn.MultiheadAttention`` whose ``out_proj`` is
    quantized is swapped too (with no specs of its own when the recipe gives none), since
    only its quantized forward calls ``out_proj``. MoE routers are excluded by default unless a target names
    them (:mod:`lowbit.nn.routers`). The report's ``coverage`` says which share of the
    weights is quantized and why every other weight parameter is not. Each of these is a
    warning, or a ConfigError with ``strict: true``: a target pattern that matches no module;
    a recipe targeting every linear that leaves more than 2% of the non-embedding weights
    with no quantized class (3-D MoE experts not yet split into per-expert linears --
    :func:`lowbit.quantize` splits them first, :func:`lowbit.adapters.experts.unfuse_experts`
    does it alone --, an ``nn.MultiheadAttention`` with kdim/vdim/add_bias_kv, a Linear
    subclass that overrides ``forward``); a KV-cache spec with no attention module. A
    recipe group size that does not divide a layer's width falls back to the largest divisor
    below it (``group_policy: fallback``, every layer listed in ``report.fallbacks`` and named
    in one warning) or is a ConfigError naming the layer and the sizes that would work
    (``group_policy: strict``, the policy of a group size given as an override). Every check
    runs before the first module changes.
    """
    report = ApplyReport()
    routers = find_routers(model)
    used: set[int] = set()
    plan = []
    bad: list[tuple[str, int, int]] = []
    n_linear, targets_all = 0, True
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantMixin):
            raise ConfigError(f"module {name} is already quantized; start from the "
                              "unquantized model")
        if _linear_like(m) and not recipe.is_excluded(name) and name not in routers:
            n_linear += 1
            targets_all &= recipe.specs_for(name)[0]["weight"] is not None
        if quant_class_for(m) is None:
            continue
        specs, hits = recipe.specs_for(name)
        if not hits:
            continue
        used.update(hits)
        if recipe.is_excluded(name):
            report.excluded.append(name)
            continue
        if name in routers and not recipe.names_module(name):
            report.routers.append(name)
            continue
        if all(s is None for s in specs.values()):
            continue
        cls = quant_class_for(m)
        in_features = cls.in_features_of(m)
        notes: list[str] = []
        weight = _resolve_group(specs["weight"], in_features, name, recipe, notes, bad)
        inp = _resolve_group(specs["input"], in_features, name + " (input)", recipe, notes,
                             bad)
        report.fallbacks.extend(notes)
        note = notes[0] if weight is not specs["weight"] else ""
        plan.append((name, m, weight, inp, specs["output"], note))
    if bad:
        raise _group_error(bad)
    plan = _with_mha_parents(model, plan)
    for i, t in enumerate(recipe.targets):
        if i not in used:
            report.unmatched_patterns.extend(t.patterns)
    if report.unmatched_patterns:
        _warn_or_raise(f"recipe {recipe.name}: pattern(s) {report.unmatched_patterns} match "
                       "no quantizable module", recipe.strict)
    report.coverage = weight_coverage(
        model, recipe, quantized=[p[0] for p in plan if p[2] is not None], routers=routers,
        targets_all=n_linear > 0 and targets_all)
    msg = report.coverage.warning(recipe.name)
    if msg is not None:
        _warn_or_raise(msg, recipe.strict)
    if report.fallbacks:
        warnings.warn(f"recipe {recipe.name}: {fallback_line(report.fallbacks)}", stacklevel=2)
    for name, m, weight, inp, out, note in plan:
        quantize_module(m, weight, inp, out, name)
        if note:
            m.weight_quantizer.note = note
        report.quantized.append(name)
    if recipe.kv_cache is not None:
        report.kv_cache = attach_kv_quantizers(model, recipe.kv_cache)
        if not report.kv_cache:
            _warn_or_raise(f"recipe {recipe.name}: kv_cache is set but no attention module "
                           "was found", recipe.strict)
    return report
