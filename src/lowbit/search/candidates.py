"""Candidate formats of the search, and models on which one layer at a time is quantized.

A candidate is a recipe (a preset name such as ``int4-awq``, a YAML path, a dict or a
:class:`~lowbit.config.recipe.Recipe`) or a 16-bit float (``fp16``/``bf16``: the layer is
left unquantized and stored in 16 bits).

:func:`prepare` applies a candidate recipe with :func:`lowbit.quantize` to a copy of the
model, then switches every quantizer off, so the copy computes what the original does, and
hands back one :class:`LayerSwitch` per quantized layer: ``on()`` quantizes that layer alone
(its weight, and its activations when the recipe quantizes them), ``off()`` puts it back.

How the copy is made depends on the recipe's algorithm steps:

* no steps (``plain``): the copy shares the original's parameters (no memory for weights),
  since fake quantization never writes them;
* weight-writing steps (``gptq``): a full copy; GPTQ's quantized weights are kept aside and
  the original weights put back, ``on()`` swaps the quantized ones in;
* transforming steps (``awq``, ``smoothquant``): a full copy whose weights carry folded
  scales (same function as the original while quantizers are off); the layer's inputs and
  outputs are then in the copy's coordinates, which is why such a candidate gets its own
  calibration pass (see :mod:`lowbit.search.sensitivity`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lowbit import recipes as _recipes
from lowbit.config.recipe import Recipe
from lowbit.errors import ConfigError
from lowbit.eval.footprint import quantized_weight_bytes
from lowbit.nn.modules import QuantMixin

FLOAT_NAMES = {"fp16": 16, "bf16": 16, "float16": 16, "bfloat16": 16}
WEIGHT_STEPS = {"gptq"}
TRANSFORM_STEPS = {"awq", "smoothquant"}


@dataclass
class Candidate:
    """One candidate: its name and recipe (None: kept as a 16-bit float)."""

    name: str
    recipe: Recipe | None

    @property
    def is_float(self) -> bool:
        """True for ``fp16``/``bf16``: the layer stays unquantized."""
        return self.recipe is None

    @property
    def kind(self) -> str:
        """``float``, ``plain`` (no algorithm steps), ``weights`` (GPTQ) or ``transform``."""
        if self.recipe is None:
            return "float"
        steps = {a.name for a in self.recipe.algorithms}
        if not steps:
            return "plain"
        if steps <= WEIGHT_STEPS:
            return "weights"
        if steps <= TRANSFORM_STEPS:
            return "transform"
        raise ConfigError(
            f"candidate {self.name}: algorithm steps {sorted(steps)} cannot be searched per "
            f"layer (supported: only {sorted(TRANSFORM_STEPS)}, or only {sorted(WEIGHT_STEPS)})")


def parse_candidates(candidates: "Sequence[Any] | Mapping[str, Any]",
                     group_size: int | None = None) -> list[Candidate]:
    """Candidates from names/recipes (or a mapping ``name -> recipe``); ``group_size``
    overrides the group size of grouped integer specs (as :func:`lowbit.recipes.load`)."""
    if isinstance(candidates, (str, Recipe)):
        raise ConfigError("candidates must be a list of recipe names/recipes (or a mapping "
                          f"name -> recipe), got a single {type(candidates).__name__}")
    items = list(candidates.items()) if isinstance(candidates, Mapping) else \
        [(None, c) for c in candidates]
    if not items:
        raise ConfigError("candidates: expected at least one candidate format")
    over = {} if group_size is None else {"group_size": int(group_size)}
    out: list[Candidate] = []
    for key, c in items:
        if isinstance(c, str) and c.lower() in FLOAT_NAMES:
            out.append(Candidate(key or c.lower(), None))
            continue
        if not isinstance(c, (str, Recipe, dict)) and not hasattr(c, "__fspath__"):
            raise ConfigError(f"candidate {c!r}: expected a recipe name, a YAML path, a dict, "
                              "a Recipe or 'fp16'/'bf16'")
        # the group size applies to the grouped candidates; the others keep their own
        r = _recipes.load(c, **(over if over and _recipes.takes_group_size(c) else {}))
        if r.kv_cache is not None:
            raise ConfigError(f"candidate {key or r.name}: sets kv_cache, which is not per "
                              "layer; drop it from the candidates and add it to the result")
        name = key or (str(c) if isinstance(c, str) else r.name)
        out.append(Candidate(name, r))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"candidates: {dup[0]!r} is given twice")
    for c in out:
        c.kind  # noqa: B018  (unsupported steps: a clear error now, not after calibration)
    return out


@dataclass
class LayerSwitch:
    """Quantizes one layer of a prepared candidate model alone (``on``) or not (``off``)."""

    module: QuantMixin
    bits: int                              # stored bits of the weight, scales included
    q_weight: torch.Tensor | None = None   # weight-writing steps: the quantized weight
    ref_weight: torch.Tensor | None = None  # ... and the original one

    def on(self) -> None:
        """Quantize this layer (weight and the activations its recipe quantizes)."""
        if self.q_weight is not None:
            with torch.no_grad():
                self.module.weight.copy_(self.q_weight)
        for _, q in self.module.quantizers():
            q.enable()
        self.module.invalidate_weight_cache()

    @property
    def weight_only(self) -> bool:
        """Whether only the weight is quantized (no input/output quantizer)."""
        return self.module.input_quantizer.spec is None and \
            self.module.output_quantizer.spec is None

    @contextmanager
    def mirrored(self):
        """Weight-only layers: inside, the weight is ``W - (Q(W) - W)`` (the quantization
        error with the opposite sign) and the quantizers are off. Averaging the loss changes
        of ``on()`` and ``mirrored()`` cancels the first-order term: what is left measures
        the curvature term the Fisher estimate predicts."""
        if not self.weight_only:
            raise ConfigError("mirrored() is only defined for weight-only quantization")
        self.on()
        try:
            wq = self.module.quantized_weight().detach().clone()
        finally:
            self.off()
        w = self.module.weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.copy_(2 * saved - wq)
        self.module.invalidate_weight_cache()
        try:
            yield
        finally:
            with torch.no_grad():
                w.copy_(saved)
            self.module.invalidate_weight_cache()

    def off(self) -> None:
        """Back to full precision (the original function)."""
        if self.q_weight is not None:
            with torch.no_grad():
                self.module.weight.copy_(self.ref_weight)
        for _, q in self.module.quantizers():
            q.disable()
        self.module.invalidate_weight_cache()


class GroupSwitch:
    """Several :class:`LayerSwitch` es switched together (all experts of one MoE block's
    projection, searched as one unit); same interface."""

    def __init__(self, switches: list[LayerSwitch]):
        self.switches = list(switches)
        self.module = None  # no single module: estimates go member by member
        self.bits = sum(s.bits for s in self.switches)

    def on(self) -> None:
        """Quantize every member."""
        for s in self.switches:
            s.on()

    def off(self) -> None:
        """Every member back to full precision."""
        for s in self.switches:
            s.off()

    @property
    def weight_only(self) -> bool:
        """Whether every member is weight-only."""
        return all(s.weight_only for s in self.switches)

    @contextmanager
    def mirrored(self):
        """Every member mirrored at once (see :meth:`LayerSwitch.mirrored`)."""
        from contextlib import ExitStack

        with ExitStack() as stack:
            for s in self.switches:
                stack.enter_context(s.mirrored())
            yield


@dataclass
class Prepared:
    """A candidate applied to a copy of the model, every quantizer off."""

    candidate: Candidate
    model: nn.Module
    layers: dict[str, LayerSwitch] = field(default_factory=dict)

    @property
    def own_pass(self) -> bool:
        """Whether its layers see other inputs than the original model's (folded scales)."""
        return self.candidate.kind == "transform"


def weight_bits(module: nn.Module) -> int:
    """Bits ``module``'s weight occupies as quantized now (codes, scales, zero-points;
    :func:`lowbit.eval.footprint.quantized_weight_bytes` times 8)."""
    return int(round(8 * quantized_weight_bytes(module)))


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its parameters (modules and buffers are new)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def prepare(model: nn.Module, cand: Candidate, forward_loop: Callable | None) -> Prepared:
    """Apply ``cand``'s recipe to a copy of ``model`` (``model`` is not changed) and switch
    every quantizer off; see the module doc. ``forward_loop`` calibrates static activations
    and runs algorithm steps."""
    from lowbit.pipeline import quantize

    kind = cand.kind
    if kind == "float":
        raise ConfigError(f"candidate {cand.name} is a float, nothing to prepare")
    work = shared_copy(model) if kind == "plain" else copy.deepcopy(model)
    quantize(work, cand.recipe, forward_loop)
    orig = dict(model.named_modules())
    prep = Prepared(cand, work)
    for name, m in work.named_modules():
        if not isinstance(m, QuantMixin) or not any(q.is_enabled for _, q in m.quantizers()):
            continue
        sw = LayerSwitch(m, weight_bits(m) if m.weight_quantizer.is_enabled else
                         m.weight.numel() * 16)
        if kind == "weights":
            ref = orig[name].weight
            sw.q_weight = m.quantized_weight().detach().clone()
            sw.ref_weight = ref.detach()
        prep.layers[name] = sw
        sw.off()
    return prep
