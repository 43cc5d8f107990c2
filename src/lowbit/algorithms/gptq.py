"""GPTQ: quantize a weight column by column, compensating each error with the Hessian.

For a linear layer ``y = W x`` and calibration inputs ``X``, ``H = 2/N * sum x x^T``. Columns
are quantized in order (or by descending ``diag(H)`` with ``act_order``); after each column,
the not-yet-quantized columns absorb its error: ``W[:, j:] -= err * Hinv[i, j:] / Hinv[i, i]``
(with ``Hinv`` the upper Cholesky factor of ``H^-1``), in lazy batches of ``block_size``
columns (Frantar et al. 2022, and the reference implementation's numerics).

Scales: per-tensor and per-channel specs take their scales from the whole weight up front;
grouped specs (int, FP4/FP6/FP8 groups, NVFP4, MX) compute each group's scale when the sweep
reaches the group's first column, from the current (error-compensated) weights. With
``act_order`` the group scales are computed up front from the original weights ("static
groups"), so every column keeps its natural group and the result exports like any other.
All rounding goes through :func:`lowbit.core.fake_quant`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lowbit.core import QuantSpec, fake_quant, quantize
from lowbit.errors import CalibrationError


class HessianAccumulator:
    """Running ``H = 2/N * sum_t x_t x_t^T`` over calibration tokens ``x_t`` (float32 or 64).

    ``state_dict()`` holds ``H * N`` (the sum) and ``N`` so that summing states across
    processes (an all-reduce) and dividing gives exactly the single-process H.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations ``x [..., in_features]`` (any float dtype)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        n = self.n_tokens
        self.H.mul_(n / (n + m))
        x = x * (2.0 / (n + m)) ** 0.5
        self.H.addmm_(x.t(), x)
        self.n_tokens = n + m

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"sum": H * N, "n": N}`` (sums add across processes)."""
        return {"sum": self.H * self.n_tokens, "n": torch.tensor(self.n_tokens)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set H from a (possibly all-reduced) state."""
        self.n_tokens = int(state["n"])
        self.H = state["sum"] / max(self.n_tokens, 1)


@dataclass
class GPTQResult:
    """The quantized weight (dequantized values, on the grid of the scales) and its scales."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    global_scale: torch.Tensor | None
    perm: torch.Tensor | None
    loss: float
    damp: float


def _column_spec(spec: QuantSpec) -> QuantSpec:
    """A per-row spec for one column ``[out, 1]`` with fixed scales."""
    return QuantSpec(format=spec.element_format.name.removesuffix("_narrow"),
                     granularity="channel", axis=0, symmetric=spec.symmetric,
                     narrow_range=spec.narrow_range, sym_scale=spec.sym_scale)


def _group_scales(w: torch.Tensor, spec: QuantSpec, gs):
    """Scale (and zero point) ``[out, 1]`` of one group's columns ``w [out, g]``."""
    qt = quantize(w, spec, amax=gs)
    zp = qt.zero_point.float() if qt.zero_point is not None else None
    return qt.scale, zp


def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec,
                         block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                         static_groups: bool = True, max_retries: int = 5) -> GPTQResult:
    """GPTQ of ``weight [out, in]`` with Hessian ``H [in, in]`` for ``spec`` (see module doc).

    Returns a :class:`GPTQResult` whose ``weight`` satisfies
    ``fake_quant(weight, spec, scale=scale, zero_point=zero_point, global_scale=...) == weight``.
    A Cholesky failure raises the damping tenfold (with a warning) up to ``max_retries`` times.
    """
    W = weight.detach().float().clone()
    out_f, in_f = W.shape
    H = H.detach().to(torch.float64 if H.dtype == torch.float64 else torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grouped = spec.granularity == "group"
    g = spec.group_size if grouped else in_f
    bf = spec.block_format
    gscale = None
    if bf is not None and bf.global_scale:
        gscale = W.abs().amax()  # the per-tensor amax that sets NVFP4's global scale
    col_spec = _column_spec(spec)
    n_groups = in_f // g if grouped else 1
    scales = torch.zeros(out_f, n_groups)
    zps = torch.zeros(out_f, n_groups) if not spec.symmetric else None
    if not grouped:
        qt = quantize(W, spec)
        s_full = qt.scale.expand(out_f, 1) if qt.scale.dim() == 0 else qt.scale.reshape(out_f, 1)
        scales[:] = s_full
        if zps is not None:
            zps[:] = qt.zero_point.float().reshape(-1, 1).expand(out_f, 1)
    elif act_order or static_groups:
        for k in range(n_groups):
            s, z = _group_scales(W[:, k * g:(k + 1) * g], spec, gscale)
            scales[:, k:k + 1] = s
            if zps is not None:
                zps[:, k:k + 1] = z
    known = torch.zeros(n_groups, dtype=torch.bool) if grouped and not (act_order or
                                                                         static_groups) \
        else torch.ones(n_groups, dtype=torch.bool)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    order = perm if perm is not None else torch.arange(in_f)

    damp = percdamp * float(torch.mean(torch.diag(H)))
    eye = torch.eye(in_f, dtype=H.dtype)
    for attempt in range(max_retries + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                break
        if attempt == max_retries:
            raise CalibrationError(f"GPTQ: the Hessian is not positive definite even with "
                                   f"damping {damp:.3g}; use more calibration data")
        new = damp * 10 if damp > 0 else 1e-6 * max(float(torch.diag(H).abs().mean()), 1e-12)
        warnings.warn(f"GPTQ: Cholesky failed with damping {damp:.3g}; retrying with "
                      f"{new:.3g}", stacklevel=2)
        damp = new
    Hinv = U.float()

    # work on W^T so that a column of W is a contiguous row
    WT = W.t().contiguous()
    QT = torch.zeros_like(WT)
    losses = torch.zeros(out_f)
    nv_gs = _nv_global(gscale, spec) if gscale is not None else None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(order[i1 + i])
            k = col // g if grouped else 0
            if not bool(known[k]):
                # first column of a group in natural order: scales from current weights
                cur = torch.cat([W1[i:], WT[i2:]], dim=0)[:g].t()
                s, z = _group_scales(cur, spec, gscale)
                scales[:, k:k + 1] = s
                if zps is not None:
                    zps[:, k:k + 1] = z
                known[k] = True
            w = W1[i]
            sc = scales[:, k]
            if nv_gs is not None:
                sc = sc * nv_gs
            zp = zps[:, k:k + 1] if zps is not None else None
            q = fake_quant(w[:, None], col_spec, scale=sc[:, None], zero_point=zp,
                           check_finite=False)[:, 0]
            d = Hinv1[i, i]
            QT[i1 + i] = q
            err = (w - q) / d
            losses += err.square() / 2
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        WT[i2:] -= Hinv[i1:i2, i2:].t() @ Err1
    Q = QT.t().contiguous()
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    # stored layouts of the spec
    if spec.granularity == "tensor":
        scale_out = scales[0, 0].clone()
        zp_out = zps[0, 0].to(torch.int32) if zps is not None else None
    else:
        scale_out = scales.clone()
        zp_out = zps.to(torch.int32) if zps is not None else None
    return GPTQResult(weight=Q, scale=scale_out, zero_point=zp_out,
                      global_scale=None if gscale is None else _nv_global(gscale, spec),
                      perm=perm, loss=float(losses.sum()), damp=damp)


def _nv_global(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """NVFP4's global scale for a tensor amax, computed by core exactly as quantize does."""
    qt = quantize(torch.zeros(1, spec.group_size), spec, amax=amax)
    return qt.global_scale
