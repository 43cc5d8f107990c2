"""Capturing the inputs of the first decoder block (used by :mod:`lowbit.pipeline.blocks`).

The calibration batches run through the model until the first block, where a forward
pre-hook stores its arguments (hidden states, attention mask, position embeddings...) and
raises a private exception that ends the forward pass: only the embeddings run. The first
batch alone goes on through every block, recording each block's arguments, so that blocks
that get different ones (sliding-window layers) are reproduced. Single-sample calls whose other
arguments are equal are concatenated into chunks. KV caches are never replayed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.utils import quantizers
from lowbit.pipeline.distributed import LOCAL, Collective

_CACHE_KW = ("past_key_values", "past_key_value", "layer_past")


class _Stop(Exception):
    """Raised by hooks to end a forward pass early."""


# --- captured inputs -------------------------------------------------------------------------
def _detach(x):
    if torch.is_tensor(x):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def _is_cache(x) -> bool:
    """A transformers KV cache object (``DynamicCache``...): never replayed."""
    return any(c.__name__.endswith("Cache") for c in type(x).__mro__) and \
        not torch.is_tensor(x)


def _clean_kwargs(kwargs: dict) -> dict:
    kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
    for k in _CACHE_KW:
        if k in kwargs:
            kwargs[k] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return _detach(kwargs)


def _clean_args(args: tuple) -> tuple:
    return _detach(tuple(None if _is_cache(a) else a for a in args))


def _same(a, b) -> bool:
    """Equal values (tensors: same shape, dtype and elements)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and \
            a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects are different
        return a is b


def _batched(x) -> bool:
    """Whether a (nested) value holds a tensor whose first dimension could be a batch > 1."""
    if torch.is_tensor(x):
        return x.dim() > 0 and x.shape[0] > 1
    if isinstance(x, (tuple, list)):
        return any(_batched(v) for v in x)
    if isinstance(x, dict):
        return any(_batched(v) for v in x.values())
    return False


def _slice_batch(x, n: int, b: int):
    """``x`` with tensors whose first dimension is the batch ``b`` cut to ``n``."""
    if torch.is_tensor(x):
        return x[:n] if x.dim() > 0 and x.shape[0] == b and b > 1 else x
    if isinstance(x, tuple):
        return tuple(_slice_batch(v, n, b) for v in x)
    if isinstance(x, list):
        return [_slice_batch(v, n, b) for v in x]
    if isinstance(x, dict):
        return {k: _slice_batch(v, n, b) for k, v in x.items()}
    return x


@dataclass
class Chunk:
    """The arguments of one call of a block: hidden states first (positional, or the
    ``hidden_states`` keyword), the rest as captured."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states ``[batch, seq, hidden]`` (for a whole model: its first tensor
        input)."""
        if self.args:
            return self.args[0]
        if "hidden_states" in self.kwargs:
            return self.kwargs["hidden_states"]
        return next(v for v in self.kwargs.values() if torch.is_tensor(v))

    def with_hidden(self, h: torch.Tensor) -> "Chunk":
        """The same call with other hidden states."""
        if self.args:
            return Chunk((h, *self.args[1:]), self.kwargs)
        return Chunk(self.args, {**self.kwargs, "hidden_states": h})

    @property
    def n_samples(self) -> int:
        """Batch size of the hidden states."""
        return self.hidden.shape[0] if self.hidden.dim() > 2 else 1

    @property
    def n_tokens(self) -> int:
        """Tokens (batch x sequence) of the hidden states."""
        return self.hidden.numel() // self.hidden.shape[-1]

    def head(self, n: int) -> "Chunk":
        """The first ``n`` samples of this chunk."""
        b = self.n_samples
        if n >= b:
            return self
        rest = Chunk(self.args[1:] if self.args else (),
                     {k: v for k, v in self.kwargs.items() if k != "hidden_states"})
        sl = Chunk(_slice_batch(rest.args, n, b), _slice_batch(rest.kwargs, n, b))
        h = self.hidden[:n]
        if self.args:
            return Chunk((h, *sl.args), sl.kwargs)
        return Chunk(sl.args, {**sl.kwargs, "hidden_states": h})

    def rest_equal(self, other: "Chunk") -> bool:
        """Whether everything but the hidden states is equal."""
        a = (self.args[1:], {k: v for k, v in self.kwargs.items() if k != "hidden_states"})
        b = (other.args[1:], {k: v for k, v in other.kwargs.items() if k != "hidden_states"})
        return _same(a, b)


class _Chunker:
    """Concatenates consecutive single-sample calls with equal other arguments."""

    def __init__(self, chunk_size: int):
        self.chunk_size = max(1, int(chunk_size))
        self.chunks: list[Chunk] = []
        self.pending: list[Chunk] = []

    def add(self, c: Chunk) -> None:
        ok = (self.pending and c.hidden.dim() == 3 and c.hidden.shape[0] == 1 and
              c.hidden.shape[1:] == self.pending[0].hidden.shape[1:] and
              not _batched((c.args[1:], c.kwargs)) and c.rest_equal(self.pending[0]))
        if not ok:
            self.flush()
        self.pending.append(c)
        if len(self.pending) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if len(self.pending) == 1:
            self.chunks.append(self.pending[0])
        else:
            h = torch.cat([p.hidden for p in self.pending])
            self.chunks.append(self.pending[0].with_hidden(h))
        self.pending = []


@dataclass
class Captured:
    """Inputs of the first block (chunks) and, per block, keyword arguments that differ from
    the first block's (``{}`` for most models)."""

    chunks: list[Chunk]
    overrides: list[dict]


@contextmanager
def _patched_forward(model: nn.Module, forward):
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had:
            model.forward = old
        else:
            del model.forward


def capture_block_inputs(model: nn.Module, blocks: "list[nn.Module] | nn.ModuleList",
                         forward_loop: Callable[[nn.Module], Any], chunk_size: int = 8,
                         run_later_blocks: bool = True) -> Captured:
    """Run ``forward_loop`` until ``blocks[0]`` and capture its inputs (see the module doc).

    ``run_later_blocks=False``: the first batch does not run the blocks after the first
    (their weights may be absent, on the meta device): each returns block 0's output
    instead, which is enough to record its arguments (computed before the blocks).

    Raises :class:`CalibrationError` when the loop never reaches the block, and
    :class:`ConfigError` when blocks take different arguments (sliding-window layers) and the
    calibration batches differ in shape, which the runner cannot reproduce.
    """
    chunker = _Chunker(chunk_size)
    first: list[dict | None] = [None] * len(blocks)
    state = {"calls": 0}

    def hook0(mod, args, kwargs):
        c = Chunk(_clean_args(args), _clean_kwargs(kwargs))
        chunker.add(c)
        if state["calls"] == 0:
            first[0] = c
        state["calls"] += 1
        if state["calls"] > 1 or len(blocks) == 1:
            raise _Stop

    def hook_i(i):
        def hook(mod, args, kwargs):
            if state["calls"] == 1 and first[i] is None:
                first[i] = Chunk(_clean_args(args), _clean_kwargs(kwargs))
                if i == len(blocks) - 1:
                    raise _Stop
        return hook

    orig = model.forward

    def forward(*a, **k):
        try:
            return orig(*a, **k)
        except _Stop:
            return None

    hs = [blocks[0].register_forward_pre_hook(hook0, with_kwargs=True)]
    hs += [b.register_forward_pre_hook(hook_i(i), with_kwargs=True)
           for i, b in enumerate(blocks) if i > 0]
    stubs = []
    if not run_later_blocks and len(blocks) > 2:
        out0: list = []
        hs.append(blocks[0].register_forward_hook(
            lambda mod, a, o: out0.append(o) if not out0 else None))

        def stub(*a, **k):
            return out0[0]
        for b in list(blocks)[1:-1]:  # the last one stops the pass in its pre-hook
            stubs.append((b, "forward" in b.__dict__, b.__dict__.get("forward")))
            b.forward = stub
    # the first batch runs through every block: quantizers off (static ones have no scales)
    qs = [q for _, q in quantizers(model) if q.is_enabled]
    for q in qs:
        q.disable()
    try:
        with _patched_forward(model, forward), torch.no_grad():
            forward_loop(model)
    finally:
        for h in hs:
            h.remove()
        for q in qs:
            q.enable()
        for b, had, old in stubs:
            if had:
                b.forward = old
            else:
                del b.forward
    chunker.flush()
    if not chunker.chunks:
        raise CalibrationError("the forward loop never reached the first decoder block "
                               "(did it call the model?)")
    overrides = [{} for _ in blocks]
    c0 = first[0]
    for i in range(1, len(blocks)):
        ci = first[i]
        if ci is None:  # the first call stopped early (a model returning before the end)
            continue
        diff = {k: v for k, v in ci.kwargs.items()
                if k != "hidden_states" and not _same(v, c0.kwargs.get(k))}
        if len(ci.args) != len(c0.args) or not _same(ci.args[1:], c0.args[1:]):
            raise ConfigError(f"decoder block {i} gets positional arguments different from "
                              "block 0's; the block runner cannot reproduce them")
        if diff:
            for c in chunker.chunks:
                if not all(_same(c.kwargs.get(k), c0.kwargs.get(k)) for k in diff):
                    raise ConfigError(
                        f"decoder block {i} gets arguments different from block 0 "
                        f"({', '.join(sorted(diff))}) and the calibration batches differ in "
                        "shape: use batches of one length (and batch size 1)")
            overrides[i] = diff
    return Captured(chunker.chunks, overrides)



def _capture_model_inputs(model: nn.Module, forward_loop) -> Captured:
    """The model's own inputs, for models without decoder blocks (the model is the block)."""
    got: list[Chunk] = []

    def forward(*a, **k):
        got.append(Chunk(_detach(tuple(a)), _detach(dict(k))))
        return None

    with _patched_forward(model, forward), torch.no_grad():
        forward_loop(model)
    if not got:
        raise CalibrationError("the forward loop never called the model")
    return Captured(got, [{}])


def sample_plan(layout: list[tuple[int, int]], max_tokens: int) \
        -> list[tuple[int, int]] | None:
    """Which samples make about ``max_tokens`` tokens, spread over the chunks: ``[(chunk
    index, first k samples)]``, or None for all of them. ``layout``: ``(samples, tokens)``
    per chunk."""
    total = sum(t for _, t in layout)
    if total <= max_tokens:
        return None
    per_sample = max(1, total // max(1, sum(s for s, _ in layout)))
    need = max(1, max_tokens // per_sample)
    step = max(1, len(layout) // need) if need < len(layout) else 1
    picked = list(range(0, len(layout), step))
    out, got = [], 0
    take = max(1, math.ceil(need / len(picked)))
    for i in picked:
        if got >= need:
            break
        k = min(take, need - got, layout[i][0])
        out.append((i, k))
        got += k
    return out


def chunk_layout(chunks: list[Chunk], comm: Collective | None = None) \
        -> tuple[list[tuple[int, int]], int]:
    """``(layout, offset)``: ``(samples, tokens)`` of every rank's chunks in rank order, and
    the global index of this rank's first chunk (one process: its own chunks, 0)."""
    comm = comm if comm is not None else LOCAL
    mine = torch.tensor([[c.n_samples, c.n_tokens] for c in chunks], dtype=torch.int64)
    if not comm.enabled:
        return [tuple(r) for r in mine.tolist()], 0
    if not chunks:
        raise CalibrationError(f"rank {comm.rank} has no calibration chunk: every rank needs "
                               "at least one (see lowbit.pipeline.distributed.shard_batches)")
    counts = comm.gather_cat(torch.tensor([len(chunks)], dtype=torch.int64)).tolist()
    every = comm.gather_cat(mine.reshape(-1, 2))
    return [tuple(r) for r in every.tolist()], int(sum(counts[:comm.rank]))
