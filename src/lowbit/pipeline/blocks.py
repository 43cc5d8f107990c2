"""The block-by-block runner: algorithms and calibration one decoder block at a time.

1. **Capture.** The calibration batches run through the model until the first decoder
   block, where a forward pre-hook stores its arguments (hidden states, attention mask,
   position embeddings...) and raises a private exception that ends the forward pass: only
   the embeddings run. The first batch alone goes on through every block, recording each
   block's keyword arguments, so that blocks that get different ones (sliding-window layers)
   are detected. Batches of one sample whose other arguments are equal are concatenated
   into chunks of ``chunk_size`` samples (:mod:`lowbit.pipeline.capture`).
2. **Per block:** the recipe's algorithm steps run on it (:class:`BlockContext` gives them
   the captured inputs, per-channel statistics of every linear's input, Hessians, sampled
   inputs of any submodule), its static activation (and KV-cache) quantizers are calibrated
   on the same inputs, and its outputs -- quantized, or full precision with ``feed="fp"`` --
   replace its inputs chunk by chunk to become the next block's inputs.

Only one block's activations are alive at a time (plus one chunk while it is replaced). No
FX tracing: plain hooks. A model without decoder blocks runs as a single block.
"""

from __future__ import annotations

import ctypes
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.adapters import is_linear
from lowbit.errors import CalibrationError
from lowbit.nn.mha import linear_input
from lowbit.nn.modules import QuantMixin
from lowbit.nn.utils import disabled, quantizers
from lowbit.pipeline.capture import (Captured, Chunk, _detach, _Stop,
                                     capture_block_inputs, chunk_layout, sample_plan)
from lowbit.pipeline.distributed import LOCAL, Collective
from lowbit.pipeline.memo import Memo

__all__ = ["BlockContext", "Captured", "Chunk", "LinearStats", "calibrate_block", "sample_plan",
           "capture_block_inputs", "chunk_layout", "process_block", "run_blocks", "trim_heap"]


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def trim_heap() -> None:
    """Give the heap's freed pages back to the system (glibc ``malloc_trim``; a no-op
    elsewhere). Without it the mid-sized temporaries of each block (activations, scales,
    codes) fragment the heap and the resident memory creeps up from block to block."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def return_large_frees(threshold: int = 1 << 20) -> None:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own
    ``mmap`` (returned to the system on free) and stop it from raising that threshold
    (glibc raises it up to 32 MiB after each large free, after which such buffers come from
    the heap and fragment it: the resident memory of a long streamed run then creeps up
    block after block). Process-wide and permanent; a no-op elsewhere than glibc."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass


# --- statistics ------------------------------------------------------------------------------
@dataclass
class LinearStats:
    """Per-input-channel statistics of one linear's input over every calibration token:
    ``absmax [in]``, ``absmean [in]``, ``nabsmean [in]`` (mean of ``|x_t| / ||x_t||``: every
    token counts alike; both None when the steps asked for ``means=False``), the token count
    and a token ``sample [k, in]``."""

    absmax: torch.Tensor
    absmean: torch.Tensor | None
    nabsmean: torch.Tensor | None
    n_tokens: int
    sample: torch.Tensor

    def rescale(self, s: torch.Tensor) -> None:
        """The input became ``X diag(s)^-1`` (scales folded upstream)."""
        s = s.float()
        self.absmax = self.absmax / s
        if self.absmean is not None:
            self.absmean = self.absmean / s
            self.nabsmean = self.nabsmean / s  # up to a per-token factor: kept as an estimate
        self.sample = self.sample / s


# --- one block ---------------------------------------------------------------------------------
class BlockContext:
    """What an algorithm step sees of one block (``fn(ctx, args)``).

    Attributes: ``model``, ``block``, ``name`` (``model.layers.3``), ``index``, ``adapter``,
    ``chunks`` (the block's captured inputs, with their per-block overrides applied by
    :meth:`calls`), ``info`` (a dict the step may fill; it lands in the report).

    Data-parallel calibration: ``comm`` (a :class:`lowbit.pipeline.distributed.Collective`;
    default: none) combines what the ranks saw. ``chunks`` are then this rank's share,
    ``layout`` the ``(samples, tokens)`` of every chunk of every rank (rank order) and
    ``offset`` the global index of this rank's first chunk (see :func:`chunk_layout`).
    Steps combine their own statistics through ``ctx.comm`` (``sum_``, ``max_``,
    ``sum_float``...); :meth:`linear_stats` and :meth:`sample` are already global.
    ``low_memory``: after every :meth:`run`, drop the cached fake-quantized weights and give
    freed heap pages back to the system (:func:`trim_heap`). Folds through :meth:`fold` are
    checked to keep the block's float function.

    MoE blocks (:mod:`lowbit.pipeline.moe`): ``moe_all`` runs every token through every
    expert in the statistics and calibration passes (:meth:`all_experts`: activation
    statistics, :meth:`capture`, GPTQ Hessians, static quantizers), never in passes that
    only compute outputs; ``moe_min_tokens``: the under-calibration threshold (None: each
    expert's input width); ``routed``: ``{experts name: int64 [E]}`` routed tokens per
    expert, counted by :func:`process_block` before the steps.
    """

    fold_check_tokens = 256
    """Tokens (whole samples, at least one) of the block's inputs the fold check runs on."""

    def __init__(self, model, block, name, index, adapter, chunks, overrides,
                 sample_tokens: int = 512, comm: Collective | None = None,
                 layout: list[tuple[int, int]] | None = None, offset: int = 0,
                 low_memory: bool = False, moe_all: bool = False,
                 moe_min_tokens: int | None = None):
        self.model = model
        self.block = block
        self.name = name
        self.index = index
        self.adapter = adapter
        self.chunks = chunks
        self.overrides = overrides
        self.info: dict[str, Any] = {}
        self.targets: list[str] | None = None
        self.sample_tokens = sample_tokens
        self.comm = comm if comm is not None else LOCAL
        self.layout = layout
        self.offset = offset
        self.low_memory = low_memory
        self._stats: dict[str, LinearStats] | None = None
        self._stats_means = True  # whether _stats holds the means (see linear_stats)
        self._fold_check = None  # see fold()
        self.moe_all = bool(moe_all)
        self.moe_min_tokens = moe_min_tokens
        self.routed: dict[str, torch.Tensor] = {}
        self._memo: Memo | None = None
        self._final: set[str] = set()
        # feed="fp": the statistics pass keeps the block's float outputs when it runs before
        # any parameter changed (then they are what the next block gets, no extra pass; one
        # more block of activations held meanwhile, so not with low_memory)
        self.fp_feed_sig: tuple | None = None
        self.fp_outputs: list[torch.Tensor] | None = None
        self._chunk: int | None = None  # index in self.chunks of the chunk being run

    def all_experts(self):
        """Context: every token through every expert of the block's MoE experts when
        ``moe_all`` (statistics passes only; a no-op otherwise)."""
        from lowbit.pipeline.moe import all_experts

        return all_experts(self.block, self.moe_all)

    def global_layout(self) -> list[tuple[int, int]]:
        """``(samples, tokens)`` of every chunk of every rank, in global order."""
        if self.layout is not None:
            return self.layout
        return [(c.n_samples, c.n_tokens) for c in self.chunks]

    def drop_weight_caches(self) -> None:
        """Forget the block's cached fake-quantized weights (they are rebuilt when needed)."""
        for m in self.block.modules():
            if isinstance(m, QuantMixin):
                m.invalidate_weight_cache()

    # --- running the block ----------------------------------------------------------------
    def call(self, c: Chunk) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of this block for chunk ``c``."""
        return c.args, ({**c.kwargs, **self.overrides} if self.overrides else c.kwargs)

    def run(self, chunks: list[Chunk] | None = None, collect: bool = False,
            until: list[nn.Module] | None = None) -> list[torch.Tensor] | None:
        """Run the block on ``chunks`` (default: all). ``until``: stop each pass once every
        listed submodule was called (their pre-hooks ran). ``collect``: return the outputs."""
        chunks = self.chunks if chunks is None else chunks
        outs = [] if collect else None
        hooks = []
        seen: set[int] = set()
        if until:
            want = {id(m) for m in until}

            def stop(mod, args):
                seen.add(id(mod))
                if seen >= want:
                    raise _Stop
            # registered last: runs after any other pre-hook of the same module
            hooks = [m.register_forward_pre_hook(stop) for m in until]
        mine = chunks is self.chunks
        try:
            with torch.no_grad():
                for i, c in enumerate(chunks):
                    seen.clear()
                    self._chunk = i if mine else None
                    a, k = self.call(c)
                    try:
                        o = self.block(*a, **k)
                    except _Stop:
                        continue
                    if collect:
                        outs.append(_first_tensor(o))
        finally:
            self._chunk = None
            for h in hooks:
                h.remove()
            if self.low_memory:
                self.drop_weight_caches()
                trim_heap()
        return outs

    def sample(self, max_tokens: int) -> list[Chunk]:
        """About ``max_tokens`` tokens of the inputs (whole samples, spread over the chunks;
        over all ranks' chunks, each rank returning its own part)."""
        plan = sample_plan(self.global_layout(), max_tokens)
        if plan is None:
            return list(self.chunks)
        lo, hi = self.offset, self.offset + len(self.chunks)
        return [self.chunks[i - lo].head(k) for i, k in plan if lo <= i < hi]

    @contextmanager
    def weights_fp(self, modules: list[nn.Module] | None = None):
        """Weight quantizers of ``modules`` (default: every linear of the block) disabled."""
        mods = modules if modules is not None else [m for m in self.block.modules()
                                                     if isinstance(m, QuantMixin)]
        with disabled(m.weight_quantizer for m in mods if isinstance(m, QuantMixin)):
            yield

    def quantized_linears(self) -> list[str]:
        """Names (in the block) of the linears whose weights are quantized."""
        return [n for n, m in self.block.named_modules() if isinstance(m, QuantMixin)
                and is_linear(m) and m.weight_quantizer.is_enabled]

    def selected(self, name: str) -> bool:
        """Whether the step's ``targets`` patterns (if any) select the linear ``name``."""
        if not self.targets:
            return True
        from lowbit.config.recipe import match

        full = name if self.name == "(model)" else f"{self.name}.{name}"
        return any(match(p, full) or match(p, name) for p in self.targets)

    def capture(self, names: list[str], chunks: list[Chunk], fp: bool = True) \
            -> dict[str, list[tuple[tuple, dict]]]:
        """``(args, kwargs)`` of each named submodule for each of ``chunks`` (block weights
        in full precision with ``fp``); the passes stop after the last of them."""
        got: dict[str, list] = {n: [] for n in names}
        mods = [self.block.get_submodule(n) for n in names]

        def hook(mod, a, k, n):
            if isinstance(mod, nn.MultiheadAttention):  # refuses cross-attention
                linear_input(mod, a, k, n)
            got[n].append((_detach(tuple(a)), _detach(dict(k))))

        hs = [m.register_forward_pre_hook(lambda mod, a, k, n=n: hook(mod, a, k, n),
                                          with_kwargs=True) for n, m in zip(names, mods)]
        try:
            with self.all_experts():
                if fp:
                    with self.weights_fp():
                        self.run(chunks, until=mods)
                else:
                    self.run(chunks, until=mods)
        finally:
            for h in hs:
                h.remove()
        return got

    # --- statistics -------------------------------------------------------------------------
    def linear_stats(self, means: bool = True) -> dict[str, LinearStats]:
        """Statistics of every quantized linear's input (all chunks of every rank, block
        weights in full precision), computed once per block and kept up to date by
        :meth:`fold`. Sums are accumulated in float64 (exact for the per-chunk float32
        terms, so ranks combine them bit for bit). ``means=False``: only ``absmax`` and the
        sample (SmoothQuant needs no means; two passes over every input element fewer); a
        later call with ``means=True`` computes them again, with the means."""
        if self._stats is not None and (self._stats_means or not means):
            return self._stats
        self._stats_means = means
        names = self.quantized_linears()
        acc: dict[str, list] = {n: [None, None, 0, [], None] for n in names}
        layout = self.global_layout()
        total = sum(t for _, t in layout)
        per_chunk = max(1, math.ceil(self.sample_tokens / max(1, len(layout))))

        last: list = [None, None]  # the latest input tensor and its terms: linears called
        # on the very same tensor (q/k/v, gate/up) take the same terms, computed once

        def hook(mod, a, k, n):
            x0 = linear_input(mod, a, k, n).detach()
            if last[0] is not x0:
                x = x0.reshape(-1, x0.shape[-1]).float()
                ax = x.abs()
                nm = (ax / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0).double() \
                    if means else None
                if x.shape[0] > per_chunk:
                    idx = torch.linspace(0, x.shape[0] - 1, per_chunk).round().long()
                    smp = x[idx].clone()
                else:
                    smp = x.clone()
                last[:] = [x0, (ax.amax(0), ax.sum(0).double() if means else None,
                                x.shape[0], nm, smp)]
                del x, ax
            mx, sm, rows, nm, smp = last[1]
            st = acc[n]
            # (own copies: the ranks' reduction works in place, linear by linear)
            st[0] = mx.clone() if st[0] is None else torch.maximum(st[0], mx)
            if means:
                st[1] = sm.clone() if st[1] is None else st[1] + sm
                st[4] = nm.clone() if st[4] is None else st[4] + nm
            st[2] += rows
            st[3].append(smp)

        mods = [self.block.get_submodule(n) for n in names]
        hs = [m.register_forward_pre_hook(lambda mod, a, k, n=n: hook(mod, a, k, n),
                                          with_kwargs=True) for n, m in zip(names, mods)]
        from lowbit.pipeline.moe import experts_modules

        # (not with every token through every expert: then the outputs are not the model's)
        keep = self.fp_feed_sig is not None and self.fp_feed_sig == _param_sig(self.block) \
            and not (self.moe_all and experts_modules(self.block)) and not self.low_memory
        try:
            if keep:  # the whole block in float: its outputs feed the next block (feed="fp")
                with disabled(q for _, q in quantizers(self.block)):
                    self.fp_outputs = self.run(collect=True)
            else:
                with self.weights_fp(), self.all_experts():
                    self.run(until=mods)
        finally:
            last[:] = [None, None]
            for h in hs:
                h.remove()
        if self.comm.enabled:
            self._reduce_stats(acc, mods)
        self._stats = {n: LinearStats(st[0], (st[1] / max(st[2], 1)).float() if means else None,
                                      (st[4] / max(st[2], 1)).float() if means else None,
                                      st[2], torch.cat(st[3]))
                       for n, st in acc.items() if st[0] is not None and st[2] > 0}
        self.info.setdefault("stat_tokens", total)
        return self._stats

    def _reduce_stats(self, acc: dict[str, list], mods: list[nn.Module]) -> None:
        """Combine the ranks' statistics (every rank, every linear, in one order)."""
        comm = self.comm
        for (n, st), m in zip(acc.items(), mods):
            width = m.weight_2d().shape[1]
            dev = m.weight.device
            if st[0] is None:  # this rank never reached the linear (identity values)
                st[:] = [torch.zeros(width, device=dev), torch.zeros(width, device=dev,
                         dtype=torch.float64), 0, [torch.zeros(0, width, device=dev)],
                         torch.zeros(width, device=dev, dtype=torch.float64)]
            comm.max_(st[0])
            if self._stats_means:  # (the same on every rank: one recipe)
                comm.sum_(st[1])
                comm.sum_(st[4])
            st[2] = comm.sum_int(st[2])
            st[3] = [comm.gather_cat(torch.cat(st[3]))]

    def fold(self, group, s: torch.Tensor, what: str = "per-channel",
             tol: float | None = None) -> None:
        """Fold ``s`` into ``group`` (:func:`lowbit.algorithms.smoothing.fold_scales`; a norm
        that cannot run on a probe input alone is probed on its captured input) and rescale
        the statistics. Checked by :meth:`verify_folds`, which the runner calls after every
        step: the block's float output on :attr:`fold_check_tokens` tokens must stay within
        ``tol`` (None: by dtype) of the output before the step's first fold."""
        from lowbit.algorithms.foldcheck import FoldCheck

        if self._fold_check is None:
            calls = [self.call(c) for c in self.sample(self.fold_check_tokens)]
            self._fold_check = FoldCheck(self.block, calls, self.name,
                                         reduce=self.comm.sum_float)
        norm_inputs = None
        if group.prev_kind == "norm":
            def norm_inputs(prev=group.prev):
                got = self.capture([prev], [self.chunks[0].head(1)])[prev]
                if not got:
                    raise CalibrationError(f"block {self.name}: norm {prev} was never called "
                                           "on the captured inputs; nothing can be folded "
                                           "into it")
                return got[0]
        self._fold_check.fold(group, s, norm_inputs, what=what, tol=tol, check=False)
        if self._stats is not None:
            for n in group.linears:
                if n in self._stats:
                    self._stats[n].rescale(s)

    def verify_folds(self) -> float | None:
        """Check the folds since the last check (:meth:`FoldCheck.verify
        <lowbit.algorithms.foldcheck.FoldCheck.verify>`); returns the relative error (the
        block's largest goes to ``info["fold_error"]``), None without folds."""
        if self._fold_check is None or not self._fold_check.pending:
            return None
        err = self._fold_check.verify()
        self.info["fold_error"] = max(self.info.get("fold_error", 0.0), float(f"{err:.3g}"))
        return err

    def new_step(self) -> None:
        """Drop the fold check's reference (a step may change float weights, e.g. GPTQ)."""
        self._fold_check = None

    def snapshot(self) -> dict:
        """The block's parameters, weight quantizers' fixed scales and input statistics,
        for :meth:`restore`."""
        import copy

        qs = {n: (m.weight_quantizer.scale, m.weight_quantizer.zero_point,
                  m.weight_quantizer.global_scale)
              for n, m in self.block.named_modules() if isinstance(m, QuantMixin)}
        return {"params": {n: p.detach().clone() for n, p in self.block.named_parameters()},
                "scales": qs, "stats": copy.deepcopy(self._stats)}

    def restore(self, saved: dict) -> None:
        """Put the block back as :meth:`snapshot` saw it."""
        with torch.no_grad():
            for n, p in self.block.named_parameters():
                p.copy_(saved["params"][n])
        for n, m in self.block.named_modules():
            if isinstance(m, QuantMixin):
                q = m.weight_quantizer
                q.scale, q.zero_point, q.global_scale = saved["scales"][n]
                m.invalidate_weight_cache()
        self._stats = saved["stats"]
        self._fold_check = None

    def scale_groups(self, pairs: bool = True):
        """The adapter's groups of linears with a module that can absorb a scale."""
        c = self.chunks[0]
        a, k = self.call(c.head(1))
        return self.adapter.scale_groups(self.block, a, k, pairs=pairs)

    def release(self) -> None:
        """Drop the statistics (and the fold check's reference outputs)."""
        self._stats = None
        self._fold_check = None

    # --- outputs of finished linears, reused by the later passes over the block -----------
    def memoize(self, names: list[str]) -> None:
        """The linears ``names`` are final (e.g. just quantized by GPTQ): until
        :meth:`end_memo` (the block runner calls it after the pass that feeds the next
        block), a pass over ``self.chunks`` computes each one's output once per chunk and
        later passes reuse it -- only when the chunk, the input values (compared), the
        weight, its quantizers' state and the autocast state are the same, and the kept
        output was not modified in place since; anything else recomputes. Kept tensors stay
        under ``memo_mb`` (no memoization with ``low_memory``)."""
        if self.low_memory or self.memo_mb <= 0:
            return
        if self._memo is None:
            self._memo = Memo(self, self.memo_mb << 20)
        self._final.update(names)
        for n in names:
            self._memo.add(self.block.get_submodule(n))
        # and every module holding only final linears (e.g. the attention once q/k/v/o are):
        # its whole output (attention itself included) is reused
        linears = {n for n, m in self.block.named_modules() if isinstance(m, QuantMixin)}
        for n in names:
            parts = n.split(".")
            for k in range(len(parts) - 1, 0, -1):
                anc = ".".join(parts[:k])
                inside = {x for x in linears if x.startswith(anc + ".")}
                if inside and inside <= self._final:
                    self._memo.add(self.block.get_submodule(anc))

    memo_mb = 2048
    """Budget of :meth:`memoize` in MiB (inputs and outputs kept for the later passes)."""

    def end_memo(self) -> None:
        """Forget the memoized outputs and restore the linears' own forward."""
        self._final = set()
        if self._memo is not None:
            self._memo.close()
            self._memo = None


def _param_sig(block: nn.Module) -> tuple:
    """Identity and version of every parameter of ``block`` (changes with any edit)."""
    return tuple((n, p.data_ptr(), p._version) for n, p in block.named_parameters())


# the block runner (calibrate_block, process_block, run_blocks) lives in pipeline.runner
from lowbit.pipeline.runner import calibrate_block, process_block, run_blocks  # noqa: E402
