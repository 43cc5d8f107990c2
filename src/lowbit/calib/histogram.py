"""Histogram calibrators: ``percentile``, ``mse`` and ``entropy``.

All three keep, per scale unit (the tensor, or each channel), a histogram of |x| with
``num_bins`` bins over ``[0, range]``. When a batch brings a larger |x|, the range grows to it
and the existing counts are re-binned (each old bin's count moves to the new bin holding its
centre), as TensorRT's and Model Optimizer's histogram calibrators do. Memory stays
``units x num_bins`` whatever the amount of data.

* ``percentile`` (default 99.99): the upper edge of the bin where the cumulative count reaches
  ``percentile``% of the values.
* ``mse``: among candidate clipping values ``ratio * max|x|`` (``ratios``, default 100 steps
  over [0.1, 1]), the one minimising the expected squared quantization error of the
  histogram (bin centres weighted by counts, quantized with ``lowbit.core.fake_quant`` at
  that amax).
* ``entropy``: TensorRT's KL-divergence threshold: for each candidate threshold bin ``i``
  (from ``levels`` up), the reference distribution is the histogram cut at ``i`` with the
  clipped tail added to its last bin; the candidate distribution merges those ``i`` bins into
  ``levels`` (``2^(bits-1)``, 128 for 8 bits) and spreads each merged count evenly over its
  non-empty bins; the threshold with the least KL(reference || candidate) wins.
"""

from __future__ import annotations

import torch

from lowbit.calib.base import Calibrator, register_calibrator
from lowbit.core import QuantSpec, fake_quant
from lowbit.errors import ConfigError

_TINY = torch.finfo(torch.float32).tiny


class HistogramCalibrator(Calibrator):
    """Per-unit histograms of |x| over a growing range (see the module doc)."""

    def __init__(self, spec: QuantSpec, num_bins: int = 2048, **kwargs):
        if spec.block_format is not None:
            raise ConfigError(f"calibrator {type(self).name!r} does not support block format "
                              f"{spec.format}; use 'max'")
        self.num_bins = int(num_bins)
        if self.num_bins < 16:
            raise ConfigError(f"num_bins must be at least 16, got {num_bins}")
        super().__init__(spec, **kwargs)

    def reset(self) -> None:
        super().reset()
        self.hist = self.range = self.maxv = None

    def observe(self, x: torch.Tensor) -> None:
        a = self._rows(x).abs()
        if a.numel() == 0:
            return
        m = a.amax(1)
        B = self.num_bins
        if self.hist is None:
            self.range = m.clamp_min(_TINY)
            self.hist = torch.zeros(a.shape[0], B, dtype=torch.float64)
            self.maxv = m
        else:
            new = torch.maximum(self.range, m)
            if bool((new > self.range).any()):
                self.hist = _rebin(self.hist, self.range, new)
                self.range = new
            self.maxv = torch.maximum(self.maxv, m)
        idx = (a / self.range[:, None] * B).long().clamp_(0, B - 1)
        self.hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        self.n_batches += 1

    def centers(self) -> torch.Tensor:
        """Bin centres ``[units, num_bins]`` (float32)."""
        w = self.range / self.num_bins
        return ((torch.arange(self.num_bins, dtype=torch.float32) + 0.5)[None] * w[:, None])

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._need_data()
        return {"hist": self.hist, "range": self.range, "maxv": self.maxv,
                "n": torch.tensor(self.n_batches)}

    def load_state_dict(self, state) -> None:
        self.hist, self.range, self.maxv = state["hist"], state["range"], state["maxv"]
        self.n_batches = int(state["n"])

    def merge_states(self, states) -> None:
        rng = torch.stack([s["range"] for s in states]).amax(0)
        self.hist = sum(_rebin(s["hist"], s["range"], rng) for s in states)
        self.range = rng
        self.maxv = torch.stack([s["maxv"] for s in states]).amax(0)
        self.n_batches = sum(int(s["n"]) for s in states)

    def compute(self) -> dict[str, torch.Tensor]:
        self._need_data()
        amax = torch.minimum(self._amax(), self.maxv).clamp_min(0)
        return {"amax": self._shape_out(amax.float())}

    def _amax(self) -> torch.Tensor:
        raise NotImplementedError


def _rebin(hist: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Move each bin's count to the bin of the new range holding its centre."""
    B = hist.shape[1]
    if torch.equal(old, new):
        return hist.clone()
    c = (torch.arange(B, dtype=torch.float64)[None] + 0.5) * (old / B)[:, None].double()
    idx = (c / new[:, None].double() * B).long().clamp_(0, B - 1)
    return torch.zeros_like(hist).scatter_add_(1, idx, hist)


@register_calibrator("percentile")
class PercentileCalibrator(HistogramCalibrator):
    """amax = the ``percentile``-th percentile of |x| (default 99.99)."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **kwargs):
        if not 0 < percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        super().__init__(spec, **kwargs)

    def _amax(self) -> torch.Tensor:
        cdf = self.hist.cumsum(1)
        target = cdf[:, -1:] * (self.percentile / 100.0)
        idx = (cdf < target).sum(1).clamp(max=self.num_bins - 1)
        return (idx + 1).float() * (self.range / self.num_bins)


@register_calibrator("mse")
class MSECalibrator(HistogramCalibrator):
    """amax = ``ratio * max|x|`` minimising the expected squared quantization error."""

    def __init__(self, spec: QuantSpec, ratios=None, start: float = 0.1, stop: float = 1.0,
                 steps: int = 100, **kwargs):
        self.ratios = torch.as_tensor(ratios, dtype=torch.float32) if ratios is not None \
            else torch.linspace(start, stop, steps)
        super().__init__(spec, **kwargs)

    def _amax(self) -> torch.Tensor:
        c = self.centers()
        w = self.hist.float()
        spec = QuantSpec(format=self.spec.format, granularity="channel", axis=0,
                         narrow_range=self.spec.narrow_range, scale_format=self.spec.scale_format)
        best = torch.full_like(self.maxv, float("inf"))
        best_amax = self.maxv.clone()
        for r in self.ratios:
            amax = (self.maxv * r).clamp_min(_TINY)
            err = (w * (c - fake_quant(c, spec, amax=amax[:, None])) ** 2).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            best_amax = torch.where(better, amax, best_amax)
        return best_amax


@register_calibrator("entropy")
class EntropyCalibrator(HistogramCalibrator):
    """TensorRT-style KL-divergence threshold (see the module doc)."""

    def __init__(self, spec: QuantSpec, levels: int | None = None, stride: int = 1, **kwargs):
        self.levels = levels
        self.stride = int(stride)
        super().__init__(spec, **kwargs)

    def _amax(self) -> torch.Tensor:
        levels = self.levels or 2 ** (self.spec.element_format.bits - 1)
        levels = min(levels, self.num_bins)
        out = []
        for row, rng in zip(self.hist, self.range):
            i = _kl_threshold_bin(row, levels, self.stride)
            out.append(i * rng / self.num_bins)
        return torch.stack(out)


def _kl_threshold_bin(hist: torch.Tensor, levels: int, stride: int) -> int:
    """Number of bins ``i`` (threshold = upper edge of bin i-1) with the least KL."""
    hist = hist.double()
    B = hist.numel()
    total_tail = hist.flip(0).cumsum(0).flip(0)  # tail[i] = sum(hist[i:])
    best_i, best_kl = B, float("inf")
    eps = 1e-10
    for i in range(levels, B + 1, stride):
        p = hist[:i].clone()
        if i < B:
            p[-1] += total_tail[i]
        if p.sum() <= 0:
            continue
        chunk = (torch.arange(i) * levels) // i
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, hist[:i])
        nz = (hist[:i] > 0).double()
        cnt = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, nz)
        q = torch.where(nz > 0, sums[chunk] / cnt[chunk].clamp_min(1), torch.zeros_like(p))
        p = p / p.sum()
        qs = q.sum()
        if qs <= 0:
            continue
        q = q / qs
        mask = p > 0
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(eps))).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i
