"""Outputs of a block's final modules reused by the later passes over the same chunks
(:meth:`lowbit.pipeline.blocks.BlockContext.memoize`): what is compared before a kept output
is reused, and the memory it may hold."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lowbit.pipeline.blocks import BlockContext


def _same(a, b) -> bool:
    """Whether two call arguments are the same: the same object, equal tensors (values,
    shape, dtype), or containers / plain values that are equal element by element."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and \
            bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str, bool, type(None))) and type(a) is type(b):
        return a == b
    return False


def _tensors(x) -> list[torch.Tensor]:
    """The tensors inside ``x`` (nested tuples, lists, dicts)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


class Memo:
    """Per-chunk outputs of final modules (see :meth:`BlockContext.memoize`)."""

    def __init__(self, ctx: BlockContext, budget: int):
        self.ctx = ctx
        self.budget = budget
        self.used = 0
        self.peak = 0  # the most bytes held at once
        # id(module) -> {chunk: (args, kwargs, state, output, output tensors' versions)}
        self.kept: dict[int, dict] = {}
        self.mods: dict[int, nn.Module] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def state(m: nn.Module) -> tuple:
        """What the module's output depends on besides its inputs: every parameter and
        buffer (identity, version), every quantizer's state, online rotations, autocast."""
        out = [(n, t.data_ptr(), t._version, t.dtype)
               for n, t in [*m.named_parameters(), *m.named_buffers()]]
        for sub in m.modules():
            if hasattr(sub, "is_enabled") and hasattr(sub, "spec"):  # a TensorQuantizer
                amax, sc = getattr(sub, "amax", None), getattr(sub, "scale", None)
                out.append((id(sub), sub.is_enabled, getattr(sub, "mode", None), id(sub.spec),
                            None if amax is None else (amax.data_ptr(), amax._version),
                            None if sc is None else (sc.data_ptr(), sc._version)))
            elif hasattr(sub, "calibrate_all"):  # MoE experts: routing may change
                out.append((id(sub), sub.calibrate_all))
        dev = next((p.device.type for p in m.parameters()), "cpu")
        out.append((torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        return tuple(out)

    @staticmethod
    def hooked(m: nn.Module) -> bool:
        """Whether a hook inside ``m`` would be skipped by a reused output."""
        return any(sub._forward_pre_hooks or sub._forward_hooks for sub in m.modules())

    def add(self, m: nn.Module) -> None:
        if id(m) in self.mods:
            return
        self.mods[id(m)] = m
        self.kept[id(m)] = {}
        store = self.kept[id(m)]
        memo = self

        def forward(*args, **kw):
            i = memo.ctx._chunk
            if i is None or memo.hooked(m):
                return type(m).forward(m, *args, **kw)
            st = memo.state(m)
            got = store.pop(i, None)
            if got is not None:
                ka, kk, kst, ky, kv = got
                if kst == st and [t._version for t in _tensors(ky)] == kv and \
                        _same(ka, args) and _same(kk, kw):
                    memo.hits += 1
                    store[i] = got
                    return ky
                memo.used -= memo.size(got)
            memo.misses += 1
            y = type(m).forward(m, *args, **kw)
            ys = _tensors(y)
            if not any(t.requires_grad for t in ys):
                entry = (args, kw, st, y, [t._version for t in ys])
                size = memo.size(entry)
                if memo.used + size <= memo.budget:
                    store[i] = entry
                    memo.used += size
                    memo.peak = max(memo.peak, memo.used)
            return y

        m.forward = forward

    def size(self, entry) -> int:
        """Bytes an entry keeps alive that no other entry holds (inputs are often shared:
        q/k/v read one tensor)."""
        others = {t.data_ptr() for d in self.kept.values() for e in d.values() if e is not entry
                  for t in _tensors(e[:2])}
        ins = sum(t.numel() * t.element_size() for t in _tensors(entry[:2])
                  if t.data_ptr() not in others)
        return ins + sum(t.numel() * t.element_size() for t in _tensors(entry[3]))

    def close(self) -> None:
        for m in self.mods.values():
            m.__dict__.pop("forward", None)
        self.kept.clear()
        self.mods.clear()
