"""Model specifics: where the decoder blocks are, which linears share an input, and which
norm (or linear) precedes them so that smoothing scales can be folded into it.

The generic path is found by inspection and covers the transformers decoder families
(Llama, Mistral, Qwen2/3, Gemma3, GPT-2, OPT ...):

* blocks: the longest ``nn.ModuleList`` whose items share one class and hold linears;
* input groups: one forward pass of a block records which linears receive the *same input
  tensor*, and which norm module produced it (its output is that tensor);
* linear -> linear pairs (``v_proj -> o_proj``, ``up_proj -> down_proj``) are declared per
  family in :data:`LINEAR_PAIRS`, since attention or a gate sits between them.

Norms: ``weight`` (and ``bias``) divided by the scale; Gemma's RMSNorm multiplies by
``1 + weight``, which :func:`norm_offset` reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.nn.modules import QuantMixin

# (previous linear, next linear) by attribute path inside a block, per family
LINEAR_PAIRS: dict[str, list[tuple[str, str]]] = {
    "llama": [("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")],
}


@dataclass
class InputGroup:
    """Linears that read the same input, and the module that produced it (norm or linear)."""

    linears: list[str]
    prev: str | None  # name inside the block, or None when nothing can absorb a scale
    prev_kind: str = "norm"  # "norm" or "linear"
    names: list[str] = field(default_factory=list)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(name, ModuleList)`` of the decoder blocks, or None when there is no such list."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 1:
            continue
        if len({type(b) for b in m}) != 1:
            continue
        if not any(isinstance(x, (nn.Linear, QuantMixin)) or type(x).__name__ == "Conv1D"
                   for x in m[0].modules()):
            continue
        if best is None or len(m) > len(best[1]):
            best = (name, m)
    return best


def family(model: nn.Module) -> str:
    """``"llama"`` for blocks with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj."""
    found = find_blocks(model)
    if found is None:
        return "unknown"
    b = found[1][0]
    names = {n for n, _ in b.named_modules()}
    if {"self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj",
            "mlp.gate_proj"} <= names:
        return "llama"
    return "generic"


def norm_offset(norm: nn.Module) -> float:
    """1.0 for norms that scale by ``1 + weight`` (Gemma), else 0.0."""
    return 1.0 if "Gemma" in type(norm).__name__ else 0.0


def is_norm(m: nn.Module) -> bool:
    """LayerNorm or an RMSNorm-like module with a per-channel ``weight``."""
    if isinstance(m, nn.LayerNorm):
        return True
    return "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.Tensor) \
        and m.weight.dim() == 1


def input_groups(block: nn.Module, args: tuple, kwargs: dict) -> list[InputGroup]:
    """Groups of linears sharing an input tensor in ``block``, found with one forward pass."""
    produced: dict[int, str] = {}
    seen: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # keeps tensors alive so that their ids stay unique
    handles = []

    def on_norm(mod, i, o, n):
        produced[id(o)] = n
        alive.append(o)

    def on_linear(mod, a, n):
        seen.setdefault(id(a[0]), []).append(n)
        alive.append(a[0])

    for n, m in block.named_modules():
        if is_norm(m):
            handles.append(m.register_forward_hook(lambda mod, i, o, n=n: on_norm(mod, i, o, n)))
        if isinstance(m, QuantMixin) or type(m) is nn.Linear or type(m).__name__ == "Conv1D":
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: on_linear(mod, a, n)))
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    alive.clear()
    groups = []
    for tid, lins in seen.items():
        groups.append(InputGroup(linears=sorted(set(lins), key=lins.index),
                                 prev=produced.get(tid)))
    return groups


def linear_pairs(model: nn.Module, block: nn.Module) -> list[InputGroup]:
    """Declared linear -> linear pairs whose shapes allow folding a scale across."""
    out = []
    for prev, nxt in LINEAR_PAIRS.get(family(model), []):
        p, n = block.get_submodule(prev), block.get_submodule(nxt)
        if p.weight.shape[0] == n.weight.shape[-1]:  # GQA v_proj -> o_proj does not fit
            out.append(InputGroup(linears=[nxt], prev=prev, prev_kind="linear"))
    return out
