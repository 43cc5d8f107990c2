"""The fallback adapter: the same facts found by inspection, for any model.

* blocks: the longest ``nn.ModuleList`` whose items share one class and hold linears;
* input groups: one forward pass of a block records which linears receive the *same input
  tensor* (same object), and which norm produced it (its output is that tensor);
* no linear -> linear pairs: attention or an activation sits between them, which a forward
  pass cannot tell apart from a foldable path.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.adapters.base import Adapter, InputGroup, is_linear, is_norm


def find_blocks_by_inspection(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(path, ModuleList)`` of the decoder blocks, or None when there is no such list."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 1:
            continue
        if len({type(b) for b in m}) != 1:
            continue
        if not any(is_linear(x) for x in m[0].modules()):
            continue
        if best is None or len(m) > len(best[1]):
            best = (name, m)
    return best


def groups_by_inspection(block: nn.Module, args: tuple, kwargs: dict) -> list[InputGroup]:
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
        if is_linear(m):
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: on_linear(mod, a, n)))
    try:
        with torch.no_grad():
            block(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    alive.clear()
    return [InputGroup(linears=sorted(set(lins), key=lins.index), prev=produced.get(tid))
            for tid, lins in seen.items()]


class GenericAdapter(Adapter):
    """Blocks and input groups found by inspection (needs a block's inputs for the groups)."""

    def matches(self, model: nn.Module) -> bool:  # noqa: D102
        return self.find_blocks(model) is not None

    def find_blocks(self, model: nn.Module):  # noqa: D102
        return find_blocks_by_inspection(model)

    def input_groups(self, block, args=(), kwargs=None):  # noqa: D102
        return groups_by_inspection(block, args, kwargs or {})


GENERIC = GenericAdapter(name="generic")
