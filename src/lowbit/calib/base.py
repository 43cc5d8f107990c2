"""The calibrator interface, its mergeable state, and the registry.

A calibrator watches the tensors a *static* quantizer will see (:meth:`Calibrator.observe`,
once per calibration batch) and turns what it saw into the quantizer's statistics
(:meth:`Calibrator.compute`)::

    cal = get_calibrator("percentile", spec, percentile=99.99)
    for x in batches:               # e.g. activations [batch, seq, hidden], any float dtype
        cal.observe(x)
    stats = cal.compute()           # {"amax": tensor} (+ {"amin": tensor} if not symmetric)

Statistics are in the units of ``x`` (real values, not codes) and in the **stored scale
layout** of :mod:`lowbit.core.layout`, ready for ``lowbit.core.fake_quant(x, spec,
amax=stats["amax"], amin=stats.get("amin"))``:

* ``granularity="tensor"`` (and the per-tensor global amax of ``nvfp4``): shape ``[]``;
* ``granularity="channel"``: ``Layout(spec, x.shape).natural_shape()`` with every dim but
  ``spec.axis`` equal to 1, e.g. ``[1, 1, hidden]`` for activations ``[batch, seq, hidden]``
  and ``axis=-1``. Statistics are kept per channel, so batches whose other dims differ
  (another sequence length) are fine; the number of channels must not change.

``group``, ``block`` and ``token`` granularities (and MX block formats) compute their scales
from the data at run time, so there is nothing to calibrate: :class:`ConfigError`.

**Mergeable state (distributed calibration).** ``state_dict()`` is a flat dict of tensors in
which every entry combines with the same entry of another process's state by one
element-wise reduction, listed in :attr:`Calibrator.REDUCE` (``"max"``, ``"min"`` or
``"sum"``). Histograms additionally need their bin grids aligned before the sum (see
:mod:`lowbit.calib.histogram`): every histogram grid is a power-of-two bin width, so a coarser
grid is an exact merge of a finer one. :meth:`Calibrator.merge_states` does this for a list
of states (e.g. from ``torch.distributed.all_gather_object``) and :meth:`Calibrator.all_reduce`
does it in place with ``torch.distributed.all_reduce``:

1. all-reduce MAX of the channel count (ranks that saw no data take the others' shape);
2. all-reduce MAX of the ``"max"`` entries (``exp``: the bin width exponent, ``amax``,
   ``max``) and MIN of the ``"min"`` entries (``min``, ``ndim``);
3. each rank re-bins its histograms onto the agreed (coarsest) grid, locally and exactly;
4. all-reduce SUM of the ``"sum"`` entries (``hist`` counts, ``n_batches``).

Because the re-binning is exact (integer counts, power-of-two widths) the merged state, and
so ``compute()``, is bit-identical to one process that observed all the data.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, ClassVar

import torch

from lowbit.core import QuantSpec
from lowbit.errors import CalibrationError, ConfigError

#: ``ndim`` of a state that saw no data (identity of the MIN reduction).
NO_NDIM = 1 << 20


class _hybridmethod:
    """A classmethod that, called on an instance, also loads its result into the instance."""

    def __init__(self, func):
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, cls):
        if obj is None:
            return functools.wraps(self.func)(functools.partial(self.func, cls))

        @functools.wraps(self.func)
        def bound(states):
            merged = self.func(type(obj), states)
            obj.load_state_dict(merged)
            return merged
        return bound


class Calibrator:
    """Base class of the calibrators: per-unit (tensor or channel) running extremes.

    Every calibrator tracks, per scale unit (1 unit per tensor, ``C`` per channel), the
    running ``amax = max |x|``, ``min = min x`` and ``max = max x`` (float32, units of ``x``).
    Subclasses add their own statistics and implement :meth:`compute`.

    Attributes:
        spec: the :class:`~lowbit.core.QuantSpec` being calibrated.
        per_tensor: True when one statistic covers the whole tensor (``tensor``
            granularity, or the global amax of ``nvfp4``).
        n_batches: number of non-empty tensors observed so far.
    """

    #: registry name, set by :func:`register_calibrator`
    name: ClassVar[str] = "base"
    #: whether block-scaled formats are accepted (their per-tensor global amax only)
    supports_block_formats: ClassVar[bool] = False
    #: whether affine (``symmetric=False``) specs are accepted
    supports_asymmetric: ClassVar[bool] = True
    #: how each ``state_dict()`` entry combines across processes
    REDUCE: ClassVar[dict[str, str]] = {
        "amax": "max", "min": "min", "max": "max", "n_batches": "sum", "ndim": "min",
    }

    def __init__(self, spec: QuantSpec | dict | str, **options: Any):
        spec = QuantSpec.parse(spec, where=f"calibrator {self.name!r}")
        self.spec = spec
        bf = spec.block_format
        g = spec.granularity
        if bf is not None:
            if not (bf.global_scale and self.supports_block_formats):
                what = ("only the 'max' calibrator sets its per-tensor global amax"
                        if bf.global_scale else "its block scales are computed from the data "
                        "at run time (nothing to calibrate)")
                raise ConfigError(
                    f"calibrator {self.name!r}: calibration applies to tensor and channel "
                    f"granularities only; format {spec.format} uses groups of "
                    f"{bf.block_size} and {what}")
            self.per_tensor = True
        elif g == "tensor":
            self.per_tensor = True
        elif g == "channel":
            self.per_tensor = False
        else:
            raise ConfigError(
                f"calibrator {self.name!r}: calibration applies to tensor and channel "
                f"granularities only; {spec.short()} (granularity {g!r}) computes its scales "
                "from the data at run time")
        if not spec.symmetric and not self.supports_asymmetric:
            raise ConfigError(f"calibrator {self.name!r} supports symmetric specs only; got "
                              f"{spec.short()} (use 'max', 'percentile' or 'mse')")
        if options:
            raise ConfigError(
                f"calibrator {self.name!r}: unknown option(s) {', '.join(sorted(options))}; "
                f"expected: {', '.join(self.option_names()) or '(none)'}")
        self.reset()

    @classmethod
    def option_names(cls) -> list[str]:
        """Keyword options accepted by this calibrator's constructor."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and
                                                p.name not in ("self", "spec")):
                    if p.name not in names:
                        names.append(p.name)
        return names

    # --- state ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything observed (the options are kept)."""
        self.n_batches = 0
        self.ndim: int | None = None  # smallest ndim observed (per-channel output shape)
        self.amax: torch.Tensor | None = None  # [U] float32, running max |x|
        self.min: torch.Tensor | None = None  # [U] float32, running min x
        self.max: torch.Tensor | None = None  # [U] float32, running max x

    @property
    def units(self) -> int | None:
        """Number of scale units: 1 per tensor, ``C`` per channel (None before any data)."""
        if self.per_tensor:
            return 1
        return None if self.amax is None else self.amax.numel()

    def _alloc(self, units: int, device: torch.device | str = "cpu") -> None:
        """Empty (identity) statistics for ``units`` units."""
        self.amax = torch.zeros(units, device=device)
        self.min = torch.full((units,), float("inf"), device=device)
        self.max = torch.full((units,), float("-inf"), device=device)

    # --- observing ----------------------------------------------------------------------
    def _as_units(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` as ``[N, U]`` (one column per scale unit), its own dtype; None if empty.

        Also checks the channel count and records ``ndim``.
        """
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise CalibrationError(f"calibrator {self.name!r} observes float tensors; got "
                                   f"{type(x).__name__ if not torch.is_tensor(x) else x.dtype}")
        x = x.detach()
        if self.per_tensor:
            if x.numel() == 0:
                return None
            return x.reshape(-1, 1)
        nd = x.ndim
        axis = self.spec.axis
        if not -nd <= axis < nd:
            raise CalibrationError(
                f"calibrator {self.name!r}: channel axis {axis} is out of range for an "
                f"observed tensor of shape {list(x.shape)}")
        c = x.shape[axis]
        if self.amax is not None and c != self.amax.numel():
            raise CalibrationError(
                f"calibrator {self.name!r}: observed a tensor with {c} channels along axis "
                f"{axis} (shape {list(x.shape)}) after tensors with {self.amax.numel()}")
        if self.ndim is not None and nd != self.ndim and axis >= 0:
            raise CalibrationError(
                f"calibrator {self.name!r}: observed tensors of {self.ndim} and {nd} dims "
                f"with a non-negative channel axis {axis}; use a negative axis")
        if x.numel() == 0:
            return None
        if axis % nd != nd - 1:
            x = x.movedim(axis, -1)
        return x.reshape(-1, c)

    def _observe_extremes(self, xu: torch.Tensor, ndim: int) -> None:
        """Update the running extremes from ``xu`` ``[N, U]``; raise on NaN/Inf."""
        lo, hi = torch.aminmax(xu, dim=0)
        lo, hi = lo.float(), hi.float()
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise CalibrationError(f"calibrator {self.name!r}: the observed tensor contains "
                                   "NaN/Inf values; expected finite activations")
        if self.amax is None:
            self._alloc(xu.shape[1], xu.device)
        a = torch.maximum(hi.abs(), lo.abs())
        self.amax = torch.maximum(self.amax, a.to(self.amax.device))
        self.min = torch.minimum(self.min, lo.to(self.min.device))
        self.max = torch.maximum(self.max, hi.to(self.max.device))
        self.ndim = ndim if self.ndim is None else min(self.ndim, ndim)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of one batch ``x`` (any float dtype and shape, any device).

        Per channel, ``x`` must have the channel axis ``spec.axis`` with the same number of
        channels in every batch. Empty tensors are ignored. NaN/Inf -> CalibrationError.
        """
        xu = self._as_units(x)
        if xu is None:
            return
        if self.amax is not None and xu.device != self.amax.device:
            xu = xu.to(self.amax.device)
        self._observe_extremes(xu, x.ndim)
        self._observe(xu)
        self.n_batches += 1

    def _observe(self, xu: torch.Tensor) -> None:
        """Subclass hook: extra statistics of ``xu`` ``[N, U]`` (extremes already updated)."""

    # --- results --------------------------------------------------------------------------
    def _need_data(self) -> None:
        if self.n_batches == 0:
            raise CalibrationError(
                f"calibrator {self.name!r} ({self.spec.short()}) saw no data: observe() was "
                "never called with a non-empty tensor (did the forward loop reach this "
                "quantizer?)")

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit values ``[U]`` -> stored layout (``[]`` or the natural channel shape)."""
        t = t.float()
        if self.per_tensor:
            return t.reshape(())
        shape = [1] * self.ndim
        shape[self.spec.axis] = t.numel()  # == Layout(spec, x.shape).natural_shape()
        return t.reshape(shape)

    def compute(self) -> dict[str, torch.Tensor]:
        """The calibrated statistics, float32, in the stored layout (see module doc).

        Returns ``{"amax": t}`` for symmetric specs (``t`` = clipping magnitude, >= 0) and
        ``{"amax": hi, "amin": lo}`` (clipping range of signed values) otherwise.
        Raises CalibrationError if nothing was observed. Does not change the state.
        """
        self._need_data()
        amax, amin = self._compute()
        out = {"amax": self._out(amax)}
        if not self.spec.symmetric:
            out["amin"] = self._out(amin)
        return out

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Subclass hook: per-unit ``(amax, amin)`` ``[U]`` (amin None for symmetric specs)."""
        raise NotImplementedError

    # --- state dict, merging, distributed ---------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The statistics as a flat dict of tensors (see :attr:`REDUCE` for how they merge).

        A calibrator that saw no data returns only ``n_batches`` (0) and ``ndim``.
        """
        st = {"n_batches": torch.tensor(self.n_batches, dtype=torch.int64),
              "ndim": torch.tensor(NO_NDIM if self.ndim is None else self.ndim,
                                   dtype=torch.int64)}
        if self.amax is not None:
            st.update(amax=self.amax.clone(), min=self.min.clone(), max=self.max.clone())
            st.update({k: v.clone() for k, v in self._extra_state().items()})
            dev = self.amax.device
            st = {k: v.to(dev) for k, v in st.items()}
        return st

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the statistics by ``state`` (from :meth:`state_dict` or
        :meth:`merge_states` of the same calibrator class and options)."""
        self.reset()
        n = int(state["n_batches"])
        if n == 0 or "amax" not in state:
            return
        missing = set(self.REDUCE) - set(state)
        if missing:
            raise CalibrationError(f"calibrator {self.name!r}: state misses "
                                   f"{', '.join(sorted(missing))}")
        if self.per_tensor and state["amax"].numel() != 1:
            raise CalibrationError(f"calibrator {self.name!r}: per-tensor state has "
                                   f"{state['amax'].numel()} units")
        self.n_batches = n
        self.ndim = int(state["ndim"])
        self.amax, self.min, self.max = (state[k].clone().float() for k in ("amax", "min", "max"))
        self._load_extra({k: state[k] for k in self.REDUCE if k not in Calibrator.REDUCE})

    def _load_extra(self, state: dict[str, torch.Tensor]) -> None:
        pass

    @classmethod
    def _align(cls, state: dict[str, torch.Tensor],
               agreed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bring ``state``'s ``"sum"`` entries onto the grid set by the agreed ``"max"`` and
        ``"min"`` entries (histograms re-bin here); the identity by default."""
        return state

    @_hybridmethod
    def merge_states(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The state of one calibrator that observed everything the ``states`` observed.

        ``states`` come from :meth:`state_dict` of calibrators of this class with the same
        spec and options (e.g. one per process, gathered with
        ``torch.distributed.all_gather_object``). Called on the class
        (``PercentileCalibrator.merge_states(states)`` or ``type(cal).merge_states``) it only
        returns the merged state; called on an instance (``cal.merge_states(states)``) it
        also loads it into ``cal``. ``cal.compute()`` then equals a single run over all the
        data, bit for bit.
        """
        full = [s for s in states if int(s["n_batches"]) > 0 and "amax" in s]
        if not full:
            return {"n_batches": torch.tensor(0), "ndim": torch.tensor(NO_NDIM)}
        units = {s["amax"].numel() for s in full}
        if len(units) > 1:
            raise CalibrationError(f"calibrator {cls.name!r}: cannot merge states with "
                                   f"different channel counts {sorted(units)}")
        dev = full[0]["amax"].device
        full = [{k: v.to(dev) for k, v in s.items()} for s in full]
        agreed: dict[str, torch.Tensor] = {}
        for k, op in cls.REDUCE.items():
            if op == "max":
                agreed[k] = torch.stack([s[k] for s in full]).amax(0)
            elif op == "min":
                agreed[k] = torch.stack([s[k] for s in full]).amin(0)
        aligned = [cls._align(s, agreed) for s in full]
        for k, op in cls.REDUCE.items():
            if op == "sum":
                agreed[k] = torch.stack([s[k] for s in aligned]).sum(0)
        return agreed

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Combine this calibrator with its peers on every rank of ``group``, in place.

        Collective: every rank of the (initialized) ``torch.distributed`` process group must
        call it, with calibrators of the same class, spec and options, including ranks that
        saw no data. Afterwards every rank holds the merged state (see the module doc for
        the four steps), so ``compute()`` equals a single-process run over all ranks' data.
        With the NCCL backend the statistics must live on the rank's CUDA device (they do
        when the observed tensors did).
        """
        import torch.distributed as dist

        dev = self.amax.device if self.amax is not None else (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        meta = torch.tensor([self.units or 0], dtype=torch.int64, device=dev)
        dist.all_reduce(meta, op=dist.ReduceOp.MAX, group=group)
        units = int(meta[0])
        if units == 0:
            return  # no rank saw data
        if self.amax is not None and self.amax.numel() != units:
            raise CalibrationError(f"calibrator {self.name!r}: this rank saw "
                                   f"{self.amax.numel()} channels, another {units}")
        state = self.state_dict()
        if "amax" not in state:
            self._alloc(units, dev)
            state = self.state_dict()
        agreed = {k: state[k].clone() for k, op in self.REDUCE.items() if op != "sum"}
        for k, op in self.REDUCE.items():
            if op != "sum":
                dist.all_reduce(agreed[k], group=group,
                                op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        aligned = self._align(state, agreed)  # local state onto the agreed grid
        for k, op in self.REDUCE.items():
            if op == "sum":
                agreed[k] = aligned[k].contiguous()
                dist.all_reduce(agreed[k], op=dist.ReduceOp.SUM, group=group)
        self.load_state_dict(agreed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.short()}, n_batches={self.n_batches})"


_REGISTRY: dict[str, type[Calibrator]] = {}


def register_calibrator(name: str, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: register a :class:`Calibrator` subclass under ``name``.

    ``replace=True`` allows overriding an existing name (otherwise ConfigError).
    """
    def deco(cls: type[Calibrator]) -> type[Calibrator]:
        if not (isinstance(cls, type) and issubclass(cls, Calibrator)):
            raise ConfigError(f"register_calibrator({name!r}): {cls!r} is not a Calibrator")
        if name in _REGISTRY and not replace and _REGISTRY[name] is not cls:
            raise ConfigError(f"calibrator {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def calibrator_names() -> list[str]:
    """Names of the registered calibrators (``max``, ``percentile``, ``mse``, ``entropy``...)."""
    return list(_REGISTRY)


def get_calibrator(name: str, spec: QuantSpec | dict | str, **options: Any) -> Calibrator:
    """A new calibrator ``name`` for ``spec`` with keyword ``options``.

    Unknown names or options, and granularities that cannot be calibrated (group, block,
    token), raise ConfigError naming the choices.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown calibrator {name!r}; expected one of: "
                          f"{', '.join(_REGISTRY)}")
    return _REGISTRY[name](spec, **options)
