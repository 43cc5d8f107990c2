"""Histogram calibrators: ``percentile``, ``mse`` and ``entropy``.

**The histogram.** Per scale unit (the tensor, or each channel) a calibrator keeps integer
counts (int64) of ``|x|`` in ``num_bins`` bins of width ``w = 2**exp`` over ``[0, num_bins *
w)``, where ``exp`` is the smallest integer with ``max|x| < num_bins * 2**exp`` (at least
-126). Affine specs (and ``mse``) keep the sign too: one histogram of ``x >= 0`` and one of
``-x`` for ``x < 0`` (``[U, 2, num_bins]`` counts), so the clipping range can be asymmetric.

When a batch brings a larger ``|x|`` the range grows, as in the histogram calibrators of
TensorRT and Model Optimizer, but here by whole powers of two: the bin width doubles
(``exp`` += d) and the existing counts are re-binned by summing groups of ``2**d``
neighbouring bins. Since the bin edges are then nested and ``x / w`` is exact in float32, the
re-binning loses nothing: the counts equal those of one pass over all the data with the final
(known) range, whatever the order or split of the batches, which is what makes
:meth:`~lowbit.calib.base.Calibrator.merge_states` and ``all_reduce`` exact. The price: the
data spans between ``num_bins / 2`` and ``num_bins`` bins (1025..2048 by default), not
exactly ``num_bins``. Memory: ``units x signs x num_bins`` int64, whatever the amount of data
(per channel with 4096 channels and 2048 bins: 64 MiB, 128 MiB signed).

The exact running ``max|x|`` (and min/max x) is kept beside it, and no result exceeds it.

* ``percentile`` (default 99.99): the value below which ``percentile``% of ``|x|`` lies,
  interpolated linearly inside its bin (error below one bin width). Affine specs: the
  ``percentile``-th and ``(100 - percentile)``-th percentiles of ``x``.
* ``mse``: among candidate clipping values ``ratio * max|x|`` (``ratios``, default 100 steps
  over [0.5, 1]; affine specs scale ``max x`` and ``min x`` by the same ratio), the one with
  the least expected squared quantization error over the signed histogram: points of each
  non-empty bin (``subsamples`` per bin, 4 by default; 1 = the bin centre) weighted by its
  count, quantized by :func:`lowbit.core.fake_quant` with that static amax (so every
  format, scale format and integer convention of ``spec`` is honoured).
* ``entropy``: TensorRT's KL-divergence threshold (symmetric specs). For each candidate
  threshold of ``i`` bins (``i`` from ``start_bin``, 128, up to the last non-empty bin):
  the reference ``P`` is the first ``i`` bins with the clipped tail folded into bin ``i-1``;
  the candidate ``Q`` merges those ``i`` bins (unclipped counts) into ``levels`` groups of
  ``i // levels`` bins (the last group takes the remainder; ``levels = 2**(bits-1)``, 128 for
  8-bit formats, ``2**bits`` for unsigned ones) and spreads each group's count evenly over
  its bins where ``P`` is non-zero; zero bins are smoothed with ``eps`` as MXNet/TVM do (they
  add nothing to the divergence, and a bin of ``P`` whose ``Q`` is empty gets ``q = eps``),
  and the threshold with the least ``KL(P || Q)`` wins (the largest one on ties). The
  divergences come from prefix sums, ``O(levels)`` per candidate, vectorized over
  candidates and channels. Like TensorRT's calibrator, bin 0 (exact zeros) takes
  bin 1's count (``ignore_zero_bin``). The threshold is the upper edge of bin ``i-1``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lowbit.calib.base import Calibrator, register_calibrator
from lowbit.core import QuantSpec, fake_quant
from lowbit.errors import CalibrationError, ConfigError

#: smallest bin-width exponent (w = 2^-126, the smallest normal float32: 1/w is finite)
EXP_MIN = -126
#: elements processed at once when binning (bounds the int64 index buffer to 32 MiB)
_CHUNK = 1 << 22


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """``2.0 ** e`` in float64, exact for integer ``e``."""
    return torch.ldexp(torch.ones(e.shape, dtype=torch.float64, device=e.device),
                       e.to(torch.float64))


def width_exponent(amax: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Smallest integer ``e >= EXP_MIN`` with ``amax < num_bins * 2**e`` (int64, per unit)."""
    m = amax.double()
    _, k = torch.frexp(m / num_bins)
    e = k.long()
    e = torch.where(m >= num_bins * _pow2(e), e + 1, e)
    e = torch.where(m < num_bins * _pow2(e - 1), e - 1, e)
    return torch.where(m > 0, e, torch.full_like(e, EXP_MIN)).clamp_min(EXP_MIN)


def rebin(hist: torch.Tensor, exp_old: torch.Tensor, exp_new: torch.Tensor) -> torch.Tensor:
    """Counts ``[U, S, B]`` at bin widths ``2**exp_old`` -> widths ``2**exp_new`` (>=), exactly.

    Bin ``j`` of width ``w`` lies inside bin ``j >> d`` of width ``w * 2**d``.
    """
    d = (exp_new - exp_old).clamp(0, 62)
    if not bool((d > 0).any()):
        return hist.clone()
    j = torch.arange(hist.shape[-1], device=hist.device)
    idx = torch.bitwise_right_shift(j[None, :], d[:, None])  # [U, B]
    idx = idx[:, None, :].expand_as(hist)
    return torch.zeros_like(hist).scatter_add_(2, idx, hist)


def hist_quantile(h: torch.Tensor, origin: torch.Tensor, width: torch.Tensor,
                  q: float) -> torch.Tensor:
    """The ``q``-quantile (0..1) of per-row histograms ``h`` ``[U, K]`` (float64 out, [U]).

    Row ``u``'s bin ``k`` covers ``[origin + k * width, origin + (k + 1) * width)``; values are
    taken as uniform inside a bin (linear interpolation of the CDF).
    """
    h = h.double()
    cdf = h.cumsum(1)
    target = cdf[:, -1:] * q
    k = torch.searchsorted(cdf, target).clamp_(max=h.shape[1] - 1)  # first cdf >= target
    prev = torch.where(k > 0, cdf.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(target))
    hk = h.gather(1, k)
    frac = torch.where(hk > 0, (target - prev) / hk.clamp_min(1), torch.ones_like(hk))
    return (origin.double() + (k.double() + frac.clamp(0, 1)).squeeze(1) * width.double())


class HistogramCalibrator(Calibrator):
    """Per-unit histograms of ``|x|`` (or of ``x`` by sign) on nested power-of-two grids.

    Options: ``num_bins`` (default 2048, at least 16): bins per unit (and per sign).

    Attributes (after data): ``hist`` int64 ``[U, S, num_bins]`` (``S`` = 1: ``|x|``; 2:
    ``x >= 0`` then ``-x`` for ``x < 0``), ``exp`` int64 ``[U]`` (bin width ``2**exp``, units
    of ``x``), plus the running extremes of :class:`~lowbit.calib.base.Calibrator`.
    """

    REDUCE = {**Calibrator.REDUCE, "hist": "sum", "exp": "max"}

    def __init__(self, spec: QuantSpec, num_bins: int = 2048, **options):
        if int(num_bins) != num_bins or num_bins < 16:
            raise ConfigError(f"num_bins must be an integer >= 16, got {num_bins!r}")
        self.num_bins = int(num_bins)
        super().__init__(spec, **options)

    @property
    def signs(self) -> int:
        """1 for a histogram of ``|x|``, 2 when the sign is kept (affine specs, ``mse``)."""
        return 1 if self.spec.symmetric else 2

    def reset(self) -> None:
        super().reset()
        self.hist: torch.Tensor | None = None
        self.exp: torch.Tensor | None = None

    def _alloc(self, units: int, device="cpu") -> None:
        super()._alloc(units, device)
        self.hist = torch.zeros(units, self.signs, self.num_bins, dtype=torch.int64,
                                device=device)
        self.exp = torch.full((units,), EXP_MIN, dtype=torch.int64, device=device)

    def _observe(self, xu: torch.Tensor) -> None:
        U, S, B = self.hist.shape
        need = torch.maximum(self.exp, width_exponent(self.amax, B))
        if bool((need > self.exp).any()):
            self.hist = rebin(self.hist, self.exp, need)
            self.exp = need
        inv_w = _pow2(-self.exp).float()  # exact powers of two: |x| * inv_w is exact
        offs = torch.arange(U, device=xu.device) * (S * B)
        flat = self.hist.view(-1)
        for part in xu.split(max(1, _CHUNK // U)):
            xf = part.float()
            idx = (xf.abs() * inv_w).long().clamp_(max=B - 1)  # < B since |x| < B * w
            if S == 2:
                idx += (xf < 0).long() * B
            idx += offs
            flat += torch.bincount(idx.reshape(-1), minlength=U * S * B)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {"hist": self.hist, "exp": self.exp}

    def _load_extra(self, state: dict[str, torch.Tensor]) -> None:
        hist = state["hist"]
        want = (self.amax.numel(), self.signs, self.num_bins)
        if tuple(hist.shape) != want:
            raise CalibrationError(f"calibrator {self.name!r}: histogram state of shape "
                                   f"{list(hist.shape)}, expected {list(want)} (same spec "
                                   "and num_bins on every process)")
        self.hist = hist.long().contiguous().clone()
        self.exp = state["exp"].clone().long()

    @classmethod
    def _align(cls, state, agreed):
        out = dict(state)
        out["hist"] = rebin(state["hist"].long(), state["exp"].long(), agreed["exp"].long())
        return out

    # --- views --------------------------------------------------------------------------
    def bin_width(self) -> torch.Tensor:
        """Bin width per unit, float64 ``[U]`` (units of ``x``)."""
        return _pow2(self.exp)

    def abs_histogram(self) -> torch.Tensor:
        """Counts of ``|x|`` per unit, int64 ``[U, num_bins]``; bin ``k`` covers
        ``[k * w, (k + 1) * w)`` with ``w`` = :meth:`bin_width`."""
        return self.hist.sum(1)

    def used_bins(self) -> torch.Tensor:
        """Bins up to the one holding ``max|x|``, per unit (int64 ``[U]``, <= num_bins)."""
        return (self.amax.double() / self.bin_width()).floor().long() + 1


@register_calibrator("percentile")
class PercentileCalibrator(HistogramCalibrator):
    """amax = the ``percentile``-th percentile of ``|x|`` per unit (default 99.99).

    Affine specs: ``amax`` = the ``percentile``-th percentile of ``x`` and ``amin`` the
    ``(100 - percentile)``-th. Accuracy: within one bin width (``max|x| / num_bins`` to
    ``2 max|x| / num_bins``). Options: ``percentile`` in (0, 100], ``num_bins``.
    """

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **options):
        if not 0 < float(percentile) <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        super().__init__(spec, **options)

    def _compute(self):
        q = self.percentile / 100.0
        w = self.bin_width()
        if self.spec.symmetric:
            v = hist_quantile(self.abs_histogram(), torch.zeros_like(w), w, q)
            return torch.minimum(v.float(), self.amax), None
        B = self.num_bins
        signed = torch.cat([self.hist[:, 1].flip(-1), self.hist[:, 0]], dim=1)  # over [-Bw, Bw)
        hi = hist_quantile(signed, -B * w, w, q).float()
        lo = hist_quantile(signed, -B * w, w, 1.0 - q).float()
        hi = torch.minimum(torch.maximum(hi, self.min), self.max)
        lo = torch.minimum(torch.maximum(lo, self.min), hi)
        return hi, lo


@register_calibrator("mse")
class MSECalibrator(HistogramCalibrator):
    """amax = ``ratio * max|x|`` minimising the expected squared quantization error.

    Candidates: ``ratios`` (any positive numbers) or ``steps`` evenly spaced ratios over
    ``[start, stop]`` (default 100 over [0.5, 1.0]). Errors are evaluated on the signed
    histogram: each non-empty bin is represented by ``subsamples`` evenly spaced points
    (the midpoints of its ``subsamples`` equal parts; 1 = the bin centre) sharing its count,
    quantized by :func:`lowbit.core.fake_quant` with the candidate as static amax (affine:
    ``amax = ratio * max x``, ``amin = ratio * min x``). Several points per bin matter for
    float formats, whose steps near zero are much finer than a bin (with the centre only,
    fp8 picks a ratio by aliasing noise). Ties go to the larger ratio. Cost of
    ``compute()``: ``len(ratios) x units x subsamples x non-empty bins (<= 2 num_bins)``
    fake-quantized values, in chunks of 4M. Options: ``ratios``, ``start``, ``stop``,
    ``steps``, ``subsamples`` (4), ``num_bins``.
    """

    def __init__(self, spec: QuantSpec, ratios: Iterable[float] | torch.Tensor | None = None,
                 start: float = 0.5, stop: float = 1.0, steps: int = 100, subsamples: int = 4,
                 **options):
        if int(subsamples) < 1:
            raise ConfigError(f"mse: subsamples must be >= 1, got {subsamples}")
        self.subsamples = int(subsamples)
        if ratios is None:
            if not (0 < start <= stop) or int(steps) < 1:
                raise ConfigError(f"mse: need 0 < start <= stop and steps >= 1; got start "
                                  f"{start}, stop {stop}, steps {steps}")
            r = torch.linspace(float(start), float(stop), int(steps), dtype=torch.float64)
        else:
            r = torch.as_tensor(list(ratios) if not torch.is_tensor(ratios) else ratios,
                                dtype=torch.float64).reshape(-1)
            if r.numel() == 0 or not bool((r > 0).all()) or not bool(torch.isfinite(r).all()):
                raise ConfigError(f"mse: ratios must be positive finite numbers, got "
                                  f"{r.tolist()}")
        self.ratios = torch.unique(r)  # sorted ascending
        super().__init__(spec, **options)

    @property
    def signs(self) -> int:
        return 2  # the error of -c and c differ (int codes -128..127, affine ranges)

    def _compute(self):
        U, S, B = self.hist.shape
        dev = self.hist.device
        n = int(self.used_bins().max())
        w = self.bin_width()
        j = torch.arange(n, dtype=torch.float64, device=dev).repeat(S)  # bin index
        sg = torch.tensor([1.0, -1.0], dtype=torch.float64, device=dev).repeat_interleave(n)
        cnt = self.hist[:, :, :n].reshape(U, S * n).double()
        # keep each unit's non-empty bins only (padded with zero counts to the longest)
        nz = cnt > 0
        K = max(1, int(nz.sum(1).max()))
        order = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :K]
        cnt, j, sg = cnt.gather(1, order), j[order], sg[order]
        k = self.subsamples
        sub = (torch.arange(k, dtype=torch.float64, device=dev) + 0.5) / k
        c = ((j[..., None] + sub) * (w[:, None, None] * sg[..., None])).reshape(U, K * k).float()
        cnt = (cnt / k)[..., None].expand(U, K, k).reshape(U, K * k)
        spec = self.spec.model_copy(update={"granularity": "channel", "axis": 0})
        ratios = self.ratios.to(dev)
        hi_base = self.amax if self.spec.symmetric else self.max
        lo_base = None if self.spec.symmetric else self.min
        R, K = ratios.numel(), c.shape[1]
        errs = torch.empty(R, U, dtype=torch.float64, device=dev)
        step = max(1, _CHUNK // max(1, U * K))
        for r0 in range(0, R, step):
            rc = ratios[r0:r0 + step].float()
            r = rc.numel()
            cc = c.unsqueeze(0).expand(r, U, K).reshape(r * U, K)
            hi = (rc[:, None] * hi_base[None, :]).reshape(-1, 1)
            lo = None if lo_base is None else (rc[:, None] * lo_base[None, :]).reshape(-1, 1)
            fq = fake_quant(cc, spec, amax=hi, amin=lo, check_finite=False)
            e = (fq.double() - cc.double()).square_().reshape(r, U, K)
            errs[r0:r0 + r] = (e * cnt[None]).sum(-1)
        best = R - 1 - errs.flip(0).argmin(0)  # last minimum: the largest ratio on ties
        rb = ratios[best].float()
        if self.spec.symmetric:
            return rb * self.amax, None
        return rb * self.max, rb * self.min


@register_calibrator("entropy")
class EntropyCalibrator(HistogramCalibrator):
    """TensorRT-style KL-divergence threshold per unit (symmetric specs; see module doc).

    Options: ``num_bins`` (2048), ``start_bin`` (128: the smallest candidate, in bins),
    ``stride`` (1: candidate spacing, in bins), ``levels`` (default ``2**(bits-1)`` of the
    element format, ``2**bits`` if unsigned), ``eps`` (1e-4: smoothing of zero bins, in
    counts), ``ignore_zero_bin`` (True). When the data spans fewer bins than
    ``max(start_bin, levels)`` the result is ``max|x|``. Per channel, every channel gets its
    own threshold (cost ~ channels x candidates x levels).
    """

    supports_asymmetric = False

    def __init__(self, spec: QuantSpec, start_bin: int = 128, stride: int = 1,
                 levels: int | None = None, eps: float = 1e-4, ignore_zero_bin: bool = True,
                 **options):
        if int(start_bin) < 1 or int(stride) < 1 or (levels is not None and int(levels) < 2):
            raise ConfigError(f"entropy: need start_bin >= 1, stride >= 1, levels >= 2; got "
                              f"{start_bin}, {stride}, {levels}")
        self.start_bin, self.stride = int(start_bin), int(stride)
        self.levels = None if levels is None else int(levels)
        self.eps = float(eps)
        self.ignore_zero_bin = bool(ignore_zero_bin)
        super().__init__(spec, **options)

    def num_levels(self) -> int:
        """Quantized levels of ``|x|``: ``levels`` or ``2**(bits-1)`` (``2**bits`` unsigned)."""
        if self.levels is not None:
            return self.levels
        fmt = self.spec.element_format
        return 2 ** (fmt.bits - (1 if fmt.signed else 0))

    def _compute(self):
        L = self.num_levels()
        start = max(self.start_bin, L)
        used = self.used_bins()
        w = self.bin_width()
        out = self.amax.clone()
        rows = ((used >= start) & (self.amax > 0)).nonzero().flatten()
        if rows.numel() == 0:
            return out, None
        n = int(used[rows].max())
        cands = torch.arange(start, n + 1, self.stride, device=out.device)
        h = self.abs_histogram()[:, :n].double()
        if self.ignore_zero_bin:
            h[:, 0] = h[:, 1]
        step = max(1, _CHUNK // 4 // (cands.numel() * L))
        for r0 in range(0, rows.numel(), step):
            r = rows[r0:r0 + step]
            kl = kl_divergences(h[r], cands, L, self.eps)  # [u, R]
            kl = torch.where(cands[None, :] <= used[r, None], kl, torch.full_like(kl, torch.inf))
            best = cands.numel() - 1 - kl.flip(1).argmin(1)  # the largest i on ties
            thr = (cands[best].double() * w[r]).float()
            out[r] = torch.minimum(thr, self.amax[r])
        return out, None


def _xlogx(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v * torch.log(v.clamp_min(1e-300)), torch.zeros_like(v))


def kl_divergences(h: torch.Tensor, cands: torch.Tensor, levels: int,
                   eps: float = 1e-4) -> torch.Tensor:
    """``KL(P_i || Q_i)`` per unit and candidate (float64 ``[U, R]``), in O(U x R x levels).

    ``h``: counts of ``|x|`` ``[U, n]`` (float64); ``cands``: candidate thresholds in bins
    ``[R]``, each with ``levels <= i <= n``. ``P_i``/``Q_i`` as in the module doc, computed
    from prefix sums over the ``levels`` groups: with ``P = p / N`` and ``Q = q / H``
    (``N`` all counts, ``H`` the unclipped ones), ``KL = (1/N) sum_groups [sum p log p -
    (sum p) log q_group] - log N + log H``. Zero bins of ``P`` contribute nothing (``Q`` is
    zero there too, both get ``eps`` when smoothed); a non-zero ``P`` bin whose group has no
    unclipped count (the folded tail alone) gets ``q = eps``. The ``O(eps / count)``
    re-normalisation of the smoothing is neglected.
    """
    h = h.double()
    U, n = h.shape
    dev = h.device
    one = (h > 0).to(h.dtype)
    C = torch.cat([h, _xlogx(h), one], 0).cumsum(1)  # [3U, n]
    C = torch.cat([torch.zeros(3 * U, 1, dtype=h.dtype, device=dev), C], 1).view(3, U, n + 1)
    N = C[0, :, -1:]  # [U, 1] all counts
    i = cands.long()
    m = (i // levels)[:, None]
    k = torch.arange(levels, device=dev)[None, :]
    lo = k * m  # [R, L] group starts
    hi = torch.where(k == levels - 1, i[:, None], lo + m)  # the last group takes the rest
    D = C[:, :, hi] - C[:, :, lo]  # [3, U, R, L]: sums of h, h log h, (h > 0) per group
    S, A, Z = D[0], D[1], D[2]
    H = C[0][:, i]  # [U, R] counts below the threshold
    T = N - H  # clipped tail, folded into bin i-1 of P
    hl = h[:, i - 1]
    pl = hl + T
    # the last group of P holds bin i-1 with the tail folded in; Q keeps the unclipped sums
    Z[..., -1] += (pl > 0).to(h.dtype) - (hl > 0).to(h.dtype)
    A[..., -1] += _xlogx(pl) - _xlogx(hl)
    q = torch.where(S > 0, S / Z.clamp_min(1), torch.full_like(S, eps))
    S[..., -1] += T  # now the sums of P per group
    terms = (A - S * torch.log(q)).masked_fill_(S <= 0, 0.0)
    kl = terms.sum(-1) / N - torch.log(N) + torch.log(H.clamp_min(1e-300))
    return torch.where(H > 0, kl, torch.full_like(kl, torch.inf))
