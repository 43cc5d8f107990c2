"""Every fold proves that it kept the block's float function, or is undone and refused.

A fold (SmoothQuant, AWQ; a rotation later) rewrites weights so that the block computes the
same function before quantization. :class:`FoldCheck` holds the block's float output
(every quantizer off) on a few captured calls and compares it after the folds: beyond
:func:`fold_tolerance` the folds are undone (weights, biases, fixed weight scales) and a
:class:`~lowbit.errors.CalibrationError` names the block, the fold and the relative error.

Folds can be checked one by one (``check=True``: one block pass each) or together
(``check=False``, then :meth:`FoldCheck.verify`: one pass for all of them; only when it
fails are they replayed one by one to name the first fold that breaks the function).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lowbit.adapters import InputGroup
from lowbit.algorithms.smoothing import fold_scales
from lowbit.errors import CalibrationError
from lowbit.nn.modules import QuantMixin
from lowbit.nn.utils import disabled, quantizers


def fold_tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of a block's float output that folds may cause when the block
    computes in ``dtype``: 1e-4 (float32/64), 5e-3 (float16), 5e-2 (bfloat16). Correct folds
    of SmolLM2-135M (SmoothQuant, 30 blocks) measured at most 3.1e-7, 7.8e-4 and 1.4e-2
    (the rounding of the rescaled weights); a wrong fold changes a block by tens of
    percent."""
    return {torch.float16: 5e-3, torch.bfloat16: 5e-2}.get(dtype, 1e-4)


def describe(group: InputGroup) -> str:
    """``prev -> linear, linear`` (for messages)."""
    return f"{group.prev} -> {', '.join(group.linears)}"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class FoldCheck:
    """A block's float function on captured calls, to check that folds keep it.

    ``calls``: ``[(args, kwargs)]`` of the block (a small sample of its captured inputs).
    The reference outputs (float32 copies: a fixed-size sample, like the statistics' token
    samples) are computed at construction with every enabled quantizer of the block off.
    ``name``: the block's name, for errors. ``tol``: relative error allowed (None:
    :func:`fold_tolerance` of the block's dtype). ``reduce``: sums a float over
    data-parallel ranks (e.g. ``ctx.comm.sum_float``), so that every rank decides alike.
    """

    def __init__(self, block: nn.Module, calls: list[tuple[tuple, dict]], name: str = "block",
                 tol: float | None = None, reduce: Callable[[float], float] | None = None):
        self.block, self.calls, self.name, self.reduce = block, calls, name, reduce
        p = next(block.parameters(), None)
        self.tol = fold_tolerance(p.dtype if p is not None else torch.float32) \
            if tol is None else float(tol)
        self.ref = list(self._outputs())
        self.ref_sq = self._sum(sum(float(r.double().square().sum()) for r in self.ref))
        self._saved: dict = {}  # module name -> state before its first unverified change
        self._pending: list[tuple[Callable[[], None], list[str], str, float]] = []

    @property
    def pending(self) -> int:
        """How many changes wait for :meth:`verify`."""
        return len(self._pending)

    def _sum(self, v: float) -> float:
        return float(v) if self.reduce is None else float(self.reduce(float(v)))

    def _float(self):
        return disabled(q for _, q in quantizers(self.block))

    @torch.no_grad()
    def _outputs(self):
        """The block's float outputs, one call at a time (float32 copies)."""
        with self._float():
            for a, k in self.calls:
                yield _first(self.block(*a, **k)).float().clone()

    def error(self) -> float:
        """Relative error ``||y - y_ref|| / ||y_ref||`` of the block's float output now
        (over all calls, and all ranks with ``reduce``)."""
        d = self._sum(sum(float((o.double() - r.double()).square().sum())
                          for o, r in zip(self._outputs(), self.ref)))
        return math.sqrt(d / self.ref_sq) if self.ref_sq > 0 else math.sqrt(d)

    def fold(self, group: InputGroup, s: torch.Tensor, norm_inputs=None,
             what: str = "per-channel", tol: float | None = None, check: bool = True) \
            -> float | None:
        """:func:`~lowbit.algorithms.smoothing.fold_scales` of ``group`` (``norm_inputs``:
        see :func:`lowbit.adapters.norm_kind`) through :meth:`guard` (``what``:
        ``"smoothquant"``, ``"awq"``...)."""
        return self.guard(lambda: fold_scales(self.block, group, s, norm_inputs),
                          [group.prev, *group.linears, *(group.readers or [])],
                          f"folding {what} scales into {describe(group)}", tol, check)

    def guard(self, change: Callable[[], None], names: list[str], what: str,
              tol: float | None = None, check: bool = True) -> float | None:
        """Run ``change()``, which must keep the block's float function and touch only the
        parameters (and fixed weight scales) of the submodules ``names``.

        ``check``: verify now (:meth:`verify`; returns the relative error); else the change
        waits for the next :meth:`verify` (returns None). When ``change`` raises, every
        unverified change is undone and the exception propagates.
        """
        for n in names:
            if n not in self._saved:
                self._saved.update(save_modules(self.block, [n]))
        try:
            change()
        except BaseException:
            self._undo()
            raise
        self._pending.append((change, list(names), what, self.tol if tol is None else tol))
        return self.verify() if check else None

    def verify(self) -> float:
        """Check the changes made since the last verification; returns the relative error
        of the block's float output (0.0 when there were none).

        Beyond tolerance, the changes are undone and replayed one at a time to find the
        first that breaks the function; all are undone again and a
        :class:`CalibrationError` names the block, that change and its error.
        """
        if not self._pending:
            return 0.0
        err = self.error()
        pending, tol = self._pending, min(t for *_, t in self._pending)
        if err <= tol:
            self._saved, self._pending = {}, []
            return err
        self._undo(keep=True)
        for change, _, what, t in pending:  # replay to name the culprit (rare)
            change()
            e = self.error()
            if not e <= t:
                self._undo()
                raise CalibrationError(
                    f"block {self.name}: {what} changed the block's float function (relative "
                    f"error {e:.3g} > {t:.3g} on the captured inputs); its weights were put "
                    "back")
        self._undo()
        raise CalibrationError(
            f"block {self.name}: {len(pending)} folds together changed the block's float "
            f"function (relative error {err:.3g} > {tol:.3g} on the captured inputs), each "
            "within it alone; their weights were put back")

    def _undo(self, keep: bool = False) -> None:
        restore_modules(self.block, self._saved)
        if not keep:
            self._saved, self._pending = {}, []


def save_modules(block: nn.Module, names: list[str]) -> dict:
    """Parameters and fixed weight scales of the named submodules (for
    :func:`restore_modules`)."""
    out = {}
    for n in names:
        m = block.get_submodule(n)
        q = getattr(m, "weight_quantizer", None) if isinstance(m, QuantMixin) else None
        out[n] = ({k: p.detach().clone() for k, p in m.named_parameters(recurse=False)},
                  None if q is None else (q.scale, q.zero_point, q.global_scale))
    return out


@torch.no_grad()
def restore_modules(block: nn.Module, saved: dict) -> None:
    """Put back what :func:`save_modules` saved."""
    for n, (params, scales) in saved.items():
        m = block.get_submodule(n)
        for k, p in m.named_parameters(recurse=False):
            p.copy_(params[k])
        if scales is not None:
            q = m.weight_quantizer
            q.scale, q.zero_point, q.global_scale = scales
        if isinstance(m, QuantMixin):
            m.invalidate_weight_cache()
