"""The adapter contract: what a quantization algorithm needs to know about a model family.

An :class:`Adapter` is declarative: the attribute path of the decoder blocks, the groups of
linears that read one input with the norm that produces it (``input_layernorm -> q/k/v``),
and the linear -> linear pairs across which a per-channel scale can be folded
(``v_proj -> o_proj``, ``up_proj -> down_proj``). One adapter per family, registered by
``model_type``; :mod:`lowbit.adapters.generic` finds the same facts by inspection for any
other model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lowbit.adapters.norms import NORM_KINDS
from lowbit.errors import ConfigError
from lowbit.nn.modules import QuantMixin


@dataclass
class InputGroup:
    """Linears that read the same input, and the module that produced it (norm or linear).

    ``linears``: names inside the block, in execution order. ``prev``: the module that can
    absorb ``1/s`` (None when nothing can). ``prev_kind``: ``"norm"`` (its weight, and bias,
    are divided) or ``"linear"`` (its output rows are divided). ``norm``: how a ``"norm"``
    ``prev`` scales, as the family's adapter declares it (``"w"`` or ``"1+w"``; None: not
    declared); the fold measures it anyway (:func:`lowbit.adapters.norms.norm_kind`) and
    refuses a declaration the module does not follow.
    """

    linears: list[str]
    prev: str | None
    prev_kind: str = "norm"
    norm: str | None = None
    names: list[str] = field(default_factory=list)
    # modules that read ``prev``'s output too but stay float (MoE routers, shared-expert
    # gates): a scale folded into ``prev`` is multiplied into their weight columns, so that
    # their outputs do not change
    readers: list[str] = field(default_factory=list)
    # for a linear ``prev`` with fewer outputs than the group has inputs (grouped-query
    # attention's v_proj -> o_proj): the output channel of ``prev`` behind each input channel
    channel_map: torch.Tensor | None = None

    def tie(self, v: torch.Tensor, reduce: str = "amax") -> torch.Tensor:
        """A per-input-channel vector made equal on channels fed by one output of ``prev``
        (``reduce``: ``"amax"`` or ``"mean"`` over them); unchanged without a channel map."""
        if self.channel_map is None:
            return v
        idx = self.channel_map.to(v.device)
        n = int(idx.max()) + 1
        r = torch.zeros(n, dtype=v.dtype, device=v.device).scatter_reduce(
            0, idx, v, reduce=reduce, include_self=False)
        return r[idx]

    @property
    def parent(self) -> str:
        """The smallest module of the block holding every linear of the group (``self_attn``
        for q/k/v, ``mlp`` for gate/up, the linear itself for a group of one)."""
        if len(self.linears) == 1:
            return self.linears[0]
        parts = [n.split(".") for n in self.linears]
        common = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        return ".".join(common)


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or their quantized classes (weights ``[out, in]``)."""
    if isinstance(m, QuantMixin):
        return not isinstance(m, (nn.Conv1d, nn.Conv2d))
    return type(m) is nn.Linear or type(m).__name__ == "Conv1D"


def is_norm(m: nn.Module) -> bool:
    """LayerNorm or an RMSNorm-like module with a per-channel ``weight``."""
    if isinstance(m, nn.LayerNorm):
        return True
    return "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.Tensor) \
        and m.weight.dim() == 1




def in_features(m: nn.Module) -> int:
    """Input features of a linear-like module."""
    if isinstance(m, QuantMixin):
        return m.weight_2d().shape[1]
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[0]
    return m.weight.shape[1]


def out_features(m: nn.Module) -> int:
    """Output features of a linear-like module."""
    if isinstance(m, QuantMixin):
        return m.weight_2d().shape[0]
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[1]
    return m.weight.shape[0]


def gqa_channel_map(block: nn.Module, prev: str, nxt: str) -> torch.Tensor | None:
    """Input channel of an attention output projection -> output channel of the value
    projection behind it, for grouped-query attention (each key/value head serves
    ``num_key_value_groups`` query heads); None when the attention module does not say."""
    attn = _get(block, prev.rsplit(".", 1)[0]) if "." in prev else block
    hd = getattr(attn, "head_dim", None)
    rep = getattr(attn, "num_key_value_groups", None)
    if not isinstance(hd, int) or not isinstance(rep, int) or rep < 1:
        return None
    n_in = in_features(_get(block, nxt))
    c = torch.arange(n_in)
    head, d = c // hd, c % hd
    return (head // rep) * hd + d


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _wild(pattern: str) -> re.Pattern:
    """``mlp.experts.*.up_proj`` -> a regex where each ``*`` is one dotted part."""
    return re.compile("^" + r"([^.]+)".join(re.escape(p) for p in pattern.split("*")) + "$")


def expand(block: nn.Module, pattern: str) -> list[str]:
    """Names of ``block``'s submodules that ``pattern`` names: itself when it has no ``*``
    (if present), else every match with one dotted part per ``*`` (``mlp.experts.*.up_proj``
    -> ``mlp.experts.0.up_proj``, ...), in module order."""
    if "*" not in pattern:
        return [pattern] if _get(block, pattern) is not None else []
    rx = _wild(pattern)
    return [n for n, _ in block.named_modules() if n and rx.match(n)]


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one model family (see the module doc).

    ``blocks``: attribute paths where the ``nn.ModuleList`` of decoder blocks may be (the
    causal-LM model, and its base model). ``groups``:
    ``(norm, (linear, ...))`` pairs inside a block. ``pairs``: ``(prev linear, next linear)``
    inside a block; a pair is used where ``out(prev) == in(next)``, or where ``pair_map``
    maps each input channel of ``next`` to the output channel of ``prev`` behind it
    (grouped-query attention's ``v_proj -> o_proj``). ``model_types``: the
    ``config.model_type`` values it serves. ``accepts``: an extra check of the model (e.g.
    OPT's pre-norm layout). ``norm``: how the family's norms scale their normalised input,
    ``"w"`` (Llama's RMSNorm, LayerNorm) or ``"1+w"`` (Gemma, Qwen3-Next); None: found by
    behaviour only (:func:`lowbit.adapters.norms.norm_kind`, which also checks a
    declaration).

    Names in ``groups``, ``pairs`` and ``readers`` may hold ``*`` for one dotted part (the
    routed experts of an MoE block: ``mlp.experts.*.gate_proj``); a pair's ``*`` parts of
    ``next`` take the values matched in ``prev`` (``mlp.experts.*.up_proj ->
    mlp.experts.*.down_proj``, expert by expert). ``readers``: ``(norm, (module, ...))``:
    float modules that read the norm's output beside the group (MoE routers, shared-expert
    gates); a scale folded into the norm is multiplied into their weight columns
    (:attr:`InputGroup.readers`).
    """

    name: str
    model_types: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    accepts: Callable[[nn.Module], bool] | None = None
    pair_map: Callable[[nn.Module, str, str], "torch.Tensor | None"] | None = None
    norm: str | None = None
    readers: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        if self.norm is not None and self.norm not in NORM_KINDS:
            raise ConfigError(f"adapter {self.name}: norm must be one of "
                              f"{', '.join(NORM_KINDS)} or None, got {self.norm!r}")

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter describes ``model`` (its model type, and its structure)."""
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) not in self.model_types:
            return False
        if self.accepts is not None and not self.accepts(model):
            return False
        found = self.find_blocks(model)
        if found is None:
            return False
        b = found[1][0]
        return all(_get(b, n) is not None for _, lins in self.groups for n in lins
                   if "*" not in n)

    def find_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList] | None:
        """``(path, ModuleList)`` of the decoder blocks, or None."""
        for prefix in self.blocks:
            m = _get(model, prefix)
            if isinstance(m, nn.ModuleList) and len(m):
                return prefix, m
        return None

    def input_groups(self, block: nn.Module, args: tuple = (), kwargs: dict | None = None) \
            -> list[InputGroup]:
        """The declared groups present in ``block`` (linears missing from it are dropped)."""
        out = []
        readers = dict(self.readers)
        for prev, lins in self.groups:
            present = [n for p in lins for n in expand(block, p)]
            if present:
                has_prev = _get(block, prev) is not None
                out.append(InputGroup(linears=present, prev=prev if has_prev else None,
                                      norm=self.norm,
                                      readers=[n for p in readers.get(prev, ())
                                               for n in expand(block, p)] if has_prev
                                      else []))
        return out

    def linear_pairs(self, block: nn.Module) -> list[InputGroup]:
        """Declared ``prev -> next`` pairs whose shapes allow folding a scale across."""
        out = []
        for prev, nxt in self._expanded_pairs(block):
            p, n = _get(block, prev), _get(block, nxt)
            if p is None or n is None:
                continue
            if out_features(p) == in_features(n):
                out.append(InputGroup(linears=[nxt], prev=prev, prev_kind="linear"))
            elif self.pair_map is not None:
                idx = self.pair_map(block, prev, nxt)
                if idx is not None and idx.numel() == in_features(n) and \
                        int(idx.max()) < out_features(p):
                    out.append(InputGroup(linears=[nxt], prev=prev, prev_kind="linear",
                                          channel_map=idx))
        return out

    def _expanded_pairs(self, block: nn.Module) -> list[tuple[str, str]]:
        """The declared pairs with their ``*`` parts expanded (see the class doc)."""
        out = []
        for prev, nxt in self.pairs:
            if "*" not in prev:
                out.append((prev, nxt))
                continue
            rx = _wild(prev)
            for name in expand(block, prev):
                parts = iter(rx.match(name).groups())
                out.append((name, re.sub(r"\*", lambda _: next(parts), nxt)))
        return out

    def scale_groups(self, block: nn.Module, args: tuple = (), kwargs: dict | None = None,
                     pairs: bool = True) -> list[InputGroup]:
        """Groups with a module that can absorb a scale, in execution order of the block:
        norm groups, then (``pairs``) each linear pair placed after its ``prev``'s group."""
        groups = [g for g in self.input_groups(block, args, kwargs) if g.prev is not None]
        if not pairs:
            return groups
        order = {n: i for i, (n, _) in enumerate(block.named_modules())}
        allg = groups + self.linear_pairs(block)
        return sorted(allg, key=lambda g: order.get(g.linears[0], 0))


_REGISTRY: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` (replacing one of the same name); returns it."""
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != adapter.name]
    _REGISTRY.append(adapter)
    return adapter


def registered() -> list[Adapter]:
    """The registered (declarative) adapters."""
    return list(_REGISTRY)
