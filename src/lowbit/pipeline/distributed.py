"""Data-parallel calibration with ``torch.distributed``: every rank takes a share of the
calibration set, the statistics are combined, and every rank ends with the same model.

Launch with torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --nproc-per-node 2 -m lowbit quantize MODEL --recipe int4-gptq --calib t.txt -o out

or from Python::

    from lowbit.pipeline import distributed as D
    comm = D.init_from_env()                      # reads RANK / WORLD_SIZE (torchrun)
    lowbit.quantize(model, "int4-gptq", calib_data=ids)   # ids: the WHOLE set, every rank
    if comm.is_main:
        lowbit.save(model, "out")

What is combined, and how exactly (each rank runs its chunks of the block, then):

* activation calibrators (max, percentile, mse, entropy): their mergeable states
  (:meth:`lowbit.calib.Calibrator.all_reduce`): max/min of extremes, sums of integer
  histogram counts on an agreed power-of-two grid -- **bit-exact**;
* per-channel input statistics of the linears (SmoothQuant's ``max|X|``, AWQ's ``mean|X|``):
  max, and sums accumulated in float64 (exact for the few per-chunk float32 terms) --
  **bit-exact**; the token sample of AWQ's clipping search is gathered in rank order --
  **bit-exact**;
* scores of candidate scales (SmoothQuant alpha search, AWQ scale search, AWQ's guard):
  float64 sums of per-call float32 errors -- **bit-exact** in practice (a float64 sum of a
  few float32 numbers is exact unless their magnitudes differ by more than ~2^29);
* GPTQ Hessians ``H = 2/N sum x x^T``: summed in float32 (``H * n`` per rank, all-reduce,
  ``/ N``). One process keeps a running average, so the two differ by float32 rounding
  (relative ~1e-7): a few weights near a rounding boundary may land on the neighbouring
  code. **Tight tolerance, not bit-exact** (an exact match would need the ranks to
  accumulate one after another).

Results equal a single process over the whole set when each rank's share is whole chunks
of consecutive samples (:func:`shard_batches` does this) and the samples have one shape.
Every function here is a no-op in a single process (:data:`LOCAL`).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch

from lowbit.errors import CalibrationError, ConfigError

__all__ = ["Collective", "LOCAL", "barrier", "current", "init_from_env", "is_main",
           "shard_batches", "shutdown"]


class Collective:
    """Collectives over a ``torch.distributed`` process group, or no-ops (``enabled=False``).

    Attributes: ``rank``, ``world_size``, ``is_main`` (rank 0), ``enabled``, ``group``.
    Tensors may live anywhere: with NCCL they are moved to the rank's CUDA device for the
    collective and back.
    """

    def __init__(self, group=None, enabled: bool = False):
        self.group = group
        self.enabled = bool(enabled)
        if self.enabled:
            import torch.distributed as dist

            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self._nccl = dist.get_backend(group) == "nccl"
        else:
            self.rank, self.world_size, self._nccl = 0, 1, False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes outputs)."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Collective(rank={self.rank}, world_size={self.world_size})"

    # --- element-wise reductions, in place ---------------------------------------------------
    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        if self._nccl and t.device.type != "cuda":
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if not self.enabled:
            return t
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        x = self._dev(t if t.is_contiguous() else t.contiguous())
        dist.all_reduce(x, op=ops[op], group=self.group)
        if x is not t:
            t.copy_(x)
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (returns ``t``)."""
        return self._reduce(t, "sum")

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise max over the ranks, in place."""
        return self._reduce(t, "max")

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise min over the ranks, in place."""
        return self._reduce(t, "min")

    def sum_float(self, x: float) -> float:
        """A Python float summed over the ranks (float64)."""
        if not self.enabled:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        return float(self.sum_(t)[0])

    def sum_int(self, x: int) -> int:
        """A Python int summed over the ranks."""
        if not self.enabled:
            return int(x)
        t = torch.tensor([int(x)], dtype=torch.int64)
        return int(self.sum_(t)[0])

    # --- gathering ---------------------------------------------------------------------------
    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along dim 0 in rank order (first dims may differ,
        the others must agree); same dtype and device as ``t``."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        n = torch.tensor([t.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        if self._nccl:
            n = self._dev(n)
            sizes = [self._dev(s) for s in sizes]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s) for s in sizes]
        top = max(sizes)
        x = self._dev(t.contiguous())
        if x.shape[0] < top:
            pad = torch.zeros((top - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            x = torch.cat([x, pad])
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            import torch.distributed as dist

            if self._nccl:
                dist.barrier(group=self.group, device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier(group=self.group)

    def check_same(self, value: str, what: str) -> None:
        """Raise :class:`ConfigError` unless every rank passes the same ``value`` string
        (compared through a hash)."""
        if not self.enabled:
            return
        import hashlib

        h = int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "little")
        lo = torch.tensor([h], dtype=torch.int64)
        hi = lo.clone()
        self.min_(lo)
        self.max_(hi)
        if int(lo) != int(hi):
            raise ConfigError(f"the ranks disagree on {what}: every rank must be given the "
                              "same model, recipe and calibration data")


#: the single-process stand-in: every collective is a no-op
LOCAL = Collective()


def current(group=None) -> Collective:
    """The :class:`Collective` of the initialized default process group (or ``group``) when
    it has more than one rank, else :data:`LOCAL`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        return Collective(group, enabled=True)
    return LOCAL


def init_from_env(backend: str | None = None, timeout_s: float = 3600) -> Collective:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and return its
    :class:`Collective`; without ``WORLD_SIZE > 1`` return :data:`LOCAL` (one process).

    ``backend``: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available, else gloo);
    with NCCL the rank uses GPU ``LOCAL_RANK``. ``timeout_s``: how long a collective may wait
    for a slow rank (a block's algorithm steps on the slowest rank), in seconds.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return current()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one)."""
    return current().is_main


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    current().barrier()


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _items(batches: Any) -> tuple[list, str]:
    if isinstance(batches, torch.Tensor):
        if batches.dim() == 1:
            batches = batches.unsqueeze(0)
        return list(range(batches.shape[0])), "tensor"
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence):
        raise ConfigError(f"calibration batches must be a tensor [n, seq] or a list, got "
                          f"{type(batches).__name__}")
    return list(range(len(batches))), "list"


def shard_range(n_items: int, chunk_size: int = 8, comm: Collective | None = None) \
        -> tuple[int, int]:
    """``(start, stop)``: the items of this rank among ``n_items`` calibration samples, in
    whole chunks of ``chunk_size`` consecutive samples, ranks in order (rank 0 first).

    Raises :class:`CalibrationError` when there are fewer chunks than ranks.
    """
    comm = current() if comm is None else comm
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = -(-n_items // int(chunk_size))
    w, r = comm.world_size, comm.rank
    if chunks < w:
        raise CalibrationError(
            f"{n_items} calibration samples make {chunks} chunk(s) of {chunk_size}, fewer than "
            f"the {w} ranks: use at least {w * chunk_size} samples or a smaller chunk_size")
    c0, c1 = chunks * r // w, chunks * (r + 1) // w
    return min(n_items, c0 * chunk_size), min(n_items, c1 * chunk_size)


def shard_batches(batches: Any, chunk_size: int = 8, comm: Collective | None = None) -> Any:
    """This rank's share of the calibration ``batches``: whole chunks of ``chunk_size``
    consecutive samples, contiguous, rank 0 first, so that the runner's chunks are those a
    single process would make (needed for results equal to one process).

    ``batches``: ``LongTensor [n, seq]`` (rows are samples) or a list (items are samples of
    batch size 1: tensors ``[seq]`` / ``[1, seq]`` or dicts). Returns the same kind; in one
    process, ``batches`` itself.
    """
    comm = current() if comm is None else comm
    if not comm.enabled:
        return batches
    items, kind = _items(batches)
    a, b = shard_range(len(items), chunk_size, comm)
    if kind == "tensor":
        return (batches.unsqueeze(0) if batches.dim() == 1 else batches)[a:b]
    return list(batches)[a:b]
