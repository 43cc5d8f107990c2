"""Coverage: which share of a model's weights a recipe quantized, and why the rest was not.

*Weight parameters* are every parameter with two or more dimensions (Linear and Conv
weights, 3-D MoE expert stacks, ``nn.MultiheadAttention``'s ``in_proj_weight``, embeddings,
position embeddings, a ViT's class token...), each counted once (tied weights are one tensor)
and by element count; quantizers' own parameters are not counted. Input embeddings (with bare
parameters named ``*embed*`` or ``*token``: position embeddings, class tokens) and an untied
LM head are counted in the total and *also* reported apart: the "non-embedding" share leaves
them out. BatchNorm/LayerNorm parameters are 1-D and not counted.

Every unquantized weight parameter gets a *kind* and a one-line *reason*:

==============  ===========================================================================
kind            reasons
==============  ===========================================================================
embedding       ``embedding (excluded by recipe pattern '*embed*')``, ``embedding (not
                targeted)``...
lm_head         ``LM head (excluded by recipe pattern '*lm_head')``...
router          ``router (excluded by default)`` (see :mod:`lowbit.nn.routers`)
excluded        ``excluded by recipe pattern 'X'``
unsupported     ``3-D expert parameters of Qwen2MoeExperts: not split into per-expert
                linears (lowbit.quantize splits them: lowbit.adapters.experts)``,
                ``nn.MultiheadAttention in_proj_weight: add_bias_kv=True: not
                supported`` (others are quantized: lowbit.nn.mha), ``Linear subclass X
                overrides forward: not supported``...
untargeted      ``not targeted by any recipe pattern``, ``recipe sets no weight spec``
==============  ===========================================================================

Only the ``unsupported`` kind is warned about (:meth:`Coverage.warning`): the other kinds
are what the recipe (or the default router exclusion) asked for, and are listed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import nn

from lowbit.config.recipe import Recipe, match
from lowbit.nn.modules import QuantMixin, quant_class_for
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.nn.routers import ROUTER_REASON, find_routers, moe_blocks

LIST_SHARE = 0.005  # unquantized parameters above this share of all weights are listed
WARN_SHARE = 0.02   # unsupported share of non-embedding weights that warns (errors if strict)


@dataclass
class Unquantized:
    """One weight parameter left in floating point: full parameter name, the class of the
    module holding it, its shape, element count, kind and reason (see the module doc)."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    numel: int
    kind: str
    reason: str


@dataclass
class Coverage:
    """Element counts of the model's weight parameters (see the module docstring).

    ``total``: all weight elements; ``quantized``: those whose module quantizes its weight;
    ``embeddings`` / ``lm_head``: elements of the input embeddings (tied LM head included)
    and of an untied LM head; ``quantized_body``: quantized elements outside those two;
    ``unquantized``: every parameter left in float; ``targets_all``: the recipe targets every
    Linear it does not exclude (then :meth:`warning` may warn).
    """

    total: int = 0
    quantized: int = 0
    embeddings: int = 0
    lm_head: int = 0
    quantized_body: int = 0
    unquantized: list[Unquantized] = field(default_factory=list)
    targets_all: bool = False

    @property
    def body(self) -> int:
        """Elements of the non-embedding weights (total minus embeddings and LM head)."""
        return self.total - self.embeddings - self.lm_head

    @property
    def share(self) -> float:
        """Quantized share of all weight elements (0..1)."""
        return self.quantized / self.total if self.total else 1.0

    @property
    def body_share(self) -> float:
        """Quantized share of the non-embedding weight elements (0..1)."""
        return self.quantized_body / self.body if self.body else 1.0

    @property
    def unsupported_share(self) -> float:
        """Share of the non-embedding weight elements that no quantized class handles."""
        n = sum(u.numel for u in self.unquantized if u.kind == "unsupported")
        return n / self.body if self.body else 0.0

    def listed(self, min_share: float = LIST_SHARE) -> list[Unquantized]:
        """Unquantized parameters holding more than ``min_share`` of all weights, largest
        first."""
        out = [u for u in self.unquantized if self.total and u.numel / self.total > min_share]
        return sorted(out, key=lambda u: -u.numel)

    def kinds(self) -> list[tuple[str, str, int, int]]:
        """``(kind, reason, elements, parameters)`` summed over all unquantized parameters
        with the same reason, largest first."""
        agg: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for u in self.unquantized:
            a = agg[(u.kind, u.reason)]
            a[0] += u.numel
            a[1] += 1
        return sorted(((k, r, n, c) for (k, r), (n, c) in agg.items()), key=lambda t: -t[2])

    def line(self) -> str:
        """One line: the quantized shares of all and of non-embedding weights."""
        return (f"quantized {self.share:.1%} of the weights ({self.quantized:,} of "
                f"{self.total:,} elements); non-embedding weights {self.body_share:.1%} "
                f"({self.quantized_body:,} of {self.body:,}; input embeddings "
                f"{self.embeddings:,} and LM head {self.lm_head:,} elements counted apart)")

    def warning(self, recipe_name: str) -> str | None:
        """The one-line warning when the recipe targets every linear but more than
        ``WARN_SHARE`` of the non-embedding weights have no quantized class; else None."""
        if not self.targets_all or self.unsupported_share <= WARN_SHARE:
            return None
        top = [(r, n) for k, r, n, _ in self.kinds() if k == "unsupported"][:3]
        kinds = "; ".join(f"{r} ({n / self.body:.1%})" for r, n in top)
        return (f"recipe {recipe_name} targets every linear but left "
                f"{self.unsupported_share:.1%} of the non-embedding weights unquantized "
                f"(no quantized class): {kinds}; see model.lowbit_report.coverage")

    def as_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        d = asdict(self)
        d.update(share=self.share, body=self.body, body_share=self.body_share,
                 unsupported_share=self.unsupported_share)
        return d


def _embedding_params(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of the input- and output-embedding weights (transformers' accessors)."""
    ids = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        found = set()
        try:
            m = getattr(model, getter)() if hasattr(model, getter) else None
        except (NotImplementedError, AttributeError):
            m = None
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            found.add(id(w))
        ids.append(found)
    return ids[0], ids[1]


def _unsupported_reason(name: str, m: nn.Module, pname: str, p: torch.Tensor,
                        experts: set[str]) -> str:
    cls = type(m).__name__
    if isinstance(m, nn.MultiheadAttention):
        from lowbit.nn.mha import QuantMultiheadAttention

        why = QuantMultiheadAttention.unsupported(m)
        if why is not None:
            return f"nn.MultiheadAttention {pname}: {why}"
        return f"nn.MultiheadAttention {pname}: a bare parameter, not a Linear"
    if p.dim() == 3 and name in experts:
        return (f"3-D expert parameters of {cls}: not split into per-expert linears "
                "(lowbit.quantize splits them: lowbit.adapters.experts)")
    if pname == "weight":
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear:
            return f"Linear subclass {cls} overrides forward: not supported"
        for base in (nn.Conv1d, nn.Conv2d):
            if isinstance(m, base) and type(m) is not base:
                return f"{base.__name__} subclass {cls}: not supported"
        return f"{cls} weight: no quantized class"
    return f"{p.dim()}-D parameter {pname} of {cls}: not a module weight, no quantized class"


def _embedding_name(pname: str) -> bool:
    """A bare parameter that is an embedding by its name: ``*embed*`` (position embeddings)
    or ``*token`` (a ViT's ``cls_token``/``class_token``, ``mask_token``, register tokens:
    learned vectors joined to the activations, not weights that multiply them)."""
    return "embed" in pname or pname.endswith("token") or pname.endswith("tokens")


def _weight_name(m: nn.Module) -> str | None:
    """The parameter a quantized class quantizes in ``m`` (``weight``; ``in_proj_weight`` for
    nn.MultiheadAttention), or None when no quantized class handles ``m``."""
    cls = type(m) if isinstance(m, QuantMixin) else quant_class_for(m)
    return None if cls is None else cls.weight_name


def _supported(m: nn.Module, pname: str) -> bool:
    return pname == _weight_name(m)


def weight_coverage(model: nn.Module, recipe: Recipe | None = None,
                    quantized: Iterable[str] | None = None,
                    routers: dict[str, str] | None = None,
                    targets_all: bool = False) -> Coverage:
    """Count the quantized share of ``model``'s weights and say why the rest is not.

    Args:
        model: the model (before or after the swap; meta tensors are fine).
        recipe: the recipe, for the exclusion/target reasons (None: generic reasons).
        quantized: names of the modules whose ``weight`` is (or will be) quantized; default:
            the quantized modules of ``model`` with a weight spec.
        routers: ``{name: why}`` of the routers (default: :func:`find_routers`).
        targets_all: stored in the result (see :class:`Coverage`).
    """
    if quantized is None:
        quantized = [n for n, m in model.named_modules() if isinstance(m, QuantMixin)
                     and m.weight_quantizer.spec is not None]
    qset = set(quantized)
    routers = find_routers(model) if routers is None else routers
    experts = {f"{b}.{c}" if b else c for b, (c, _) in moe_blocks(model).items()}
    inputs, outputs = _embedding_params(model)
    owners: dict[int, list[tuple[str, nn.Module, str, torch.Tensor]]] = {}
    skip: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            skip.append(name + ".")
            continue
        if any(name.startswith(s) for s in skip):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 2:
                owners.setdefault(id(p), []).append((name, m, pname, p))
    cov = Coverage(targets_all=targets_all)
    for pid, own in owners.items():
        name, m, pname, p = own[0]
        n = p.numel()
        cov.total += n
        is_q = any(o[0] in qset and o[2] == _weight_name(o[1]) for o in own)
        emb = pid in inputs or any(isinstance(o[1], (nn.Embedding, nn.EmbeddingBag)) or
                                   (_embedding_name(o[2]) and not _supported(o[1], o[2]))
                                   for o in own)
        head = not emb and (pid in outputs or any(match("*lm_head", o[0]) for o in own))
        cov.embeddings += n if emb else 0
        cov.lm_head += n if head else 0
        if is_q:
            cov.quantized += n
            cov.quantized_body += 0 if emb or head else n
            continue
        kind, reason = _classify(own, recipe, routers, experts)
        if emb or head:
            label = "embedding" if emb else "LM head"
            if emb and pid in outputs:
                label += ", tied to the LM head"
            kind, reason = ("embedding" if emb else "lm_head"), f"{label} ({reason})"
        full = f"{name}.{pname}" if name else pname
        cov.unquantized.append(Unquantized(full, type(m).__name__, tuple(p.shape), n, kind,
                                           reason))
    return cov


def _classify(own, recipe: Recipe | None, routers: dict[str, str],
              experts: set[str]) -> tuple[str, str]:
    name, m, pname, p = own[0]
    excl = None
    if recipe is not None:
        excl = next((pat for o in own for pat in recipe.exclude if match(pat, o[0])), None)
    named = recipe is not None and any(recipe.names_module(o[0]) for o in own)
    if any(o[0] in routers for o in own) and not named and excl is None:
        return "router", ROUTER_REASON
    if excl is not None:
        return "excluded", f"excluded by recipe pattern {excl!r}"
    sup = next((o for o in own if _supported(o[1], o[2])), None)
    if sup is None:
        return "unsupported", _unsupported_reason(name, m, pname, p, experts)
    if recipe is None:
        return "untargeted", "not quantized"
    _, hits = recipe.specs_for(sup[0])
    if not hits:
        return "untargeted", "not targeted by any recipe pattern"
    return "untargeted", "recipe sets no weight spec for it"


__all__ = ["Coverage", "Unquantized", "weight_coverage", "LIST_SHARE", "WARN_SHARE"]
