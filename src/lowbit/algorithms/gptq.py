"""GPTQ: quantize a weight column by column, compensating each error with the Hessian.

For a linear layer ``y = W x`` and calibration inputs ``x_t``, ``H = 2/N * sum_t x_t x_t^T``
(:class:`HessianAccumulator`). Columns of ``W`` are quantized one at a time (in natural order,
or by descending ``diag(H)`` with ``act_order``); after each column the columns not yet
quantized absorb its error, ``W[:, j:] -= err * U[i, j:]`` with ``err = (w - q) / U[i, i]`` and
``U`` the upper Cholesky factor of ``(H + damp I)^-1``, in lazy batches of ``block_size``
columns (Frantar et al. 2022 and the numerics of the reference implementation).

Preparation, as in the reference: inputs never seen (``H_ii == 0``) get ``H_ii = 1`` and a zero
weight column; ``damp = percdamp * mean(diag(H))``; a failed Cholesky factorization is retried
with ten times the damping (with a warning), up to ``max_retries`` times, then
:class:`~lowbit.errors.CalibrationError`.

Scales (all computed by :func:`lowbit.core.compute_scales`, all rounding by
:func:`lowbit.core.fake_quant_fixed`, fake_quant's rounding with the scales fixed, one
column at a time):

* per-tensor, per-channel and 2-D block specs: from the whole weight, up front;
* groups along the input dimension (int groups, NVFP4, MXFP4/6/8): the scales of a group are
  computed when the sweep reaches the group's first column, from the *current*
  (error-compensated, lazy updates included) weights of its columns;
* ``act_order`` with ``static_groups=True`` (the default): every group's scales come from the
  original weights up front; ``act_order`` with ``static_groups=False``: a group's scales are
  computed when the sweep first reaches any of its columns, from the current weights of all
  its columns. In both cases column ``j`` keeps its natural group ``j // group_size``, so the
  scales have the ordinary stored layout ``[out, in / g]`` and the result exports like any
  other quantized weight: no ``g_idx`` is needed; ``perm`` is only informative.
  (``static_groups`` has no effect without ``act_order``: groups are then reached in order.)
* NVFP4: the per-tensor global scale comes from the whole weight's amax, up front.
* GGUF block types (``gguf_q4_k``, ``gguf_q6_k``, ``gguf_iq4_nl``, ``gguf_q5_0``...,
  :mod:`lowbit.core.ggml`): the groups are the type's super-blocks (256 columns for the K
  types and IQ4_XS, 64 for NVFP4, 32 for the legacy types and IQ4_NL). When the sweep
  reaches a super-block, its sub-block scales, mins and super scales come from
  :func:`lowbit.core.ggml.search_scales` on the current weights, with the Hessian's
  diagonal ``diag(H) / 2 = mean x^2`` (llama.cpp's imatrix, from this layer's calibration
  inputs) as the importance; each column is rounded by
  :func:`lowbit.core.ggml.round_column`. Act-order works as above. The result's
  ``zero_point`` holds float offsets (``dmin * mn``) and ``global_scale`` the super scales,
  the stored layout of the ``gguf_*`` specs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lowbit.core import Layout, QuantSpec, compute_scales, fake_quant_fixed
from lowbit.errors import CalibrationError, ConfigError, FormatError


class HessianAccumulator:
    """Running ``H = 2/N * sum_t x_t x_t^T`` over calibration tokens (float32, or float64).

    ``add`` keeps the running average of the reference (``H *= n / (n + m)``, then
    ``H += 2 / (n + m) * X^T X``). For data-parallel calibration, :meth:`state_dict` gives
    ``{"sum": sum_t 2 x_t x_t^T, "n": N}``: sum both entries over processes (an all-reduce,
    or :meth:`merge` / :meth:`all_reduce`) and :meth:`load_state_dict` rebuilds the H of one
    pass over all tokens.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None):
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"HessianAccumulator dtype must be float32 or float64, not {dtype}")
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate activations ``x [..., in_features]`` (any float dtype) entering the layer."""
        if x.shape[-1] != self.in_features:
            raise CalibrationError(f"HessianAccumulator: inputs of size {x.shape[-1]} in the last "
                                   f"dimension; expected {self.in_features} (in_features)")
        x = x.detach().reshape(-1, self.in_features).to(self.H.device, self.H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        n = self.n_tokens
        self.H.mul_(n / (n + m))
        self.H.addmm_(x.t(), x, alpha=2.0 / (n + m))
        self.n_tokens = n + m

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"sum": sum_t 2 x_t x_t^T (= H * N), "n": N}``; both add across processes."""
        return {"sum": self.H * self.n_tokens,
                "n": torch.tensor(self.n_tokens, dtype=torch.int64, device=self.H.device)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set ``H`` and ``n_tokens`` from a state (possibly summed over processes)."""
        self.n_tokens = int(state["n"])
        self.H = (state["sum"] / max(self.n_tokens, 1)).to(self.H.dtype)

    def merge(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """Add the tokens seen by ``other`` (the same as one pass over both); returns self."""
        a, b = self.state_dict(), other.state_dict()
        self.load_state_dict({"sum": a["sum"] + b["sum"].to(a["sum"]),
                              "n": int(a["n"]) + int(b["n"])})
        return self

    def all_reduce(self, group=None) -> None:
        """Sum the state over the processes of ``torch.distributed`` (every rank gets the H),
        in place: ``H * n`` summed, divided by the total ``N`` (no extra ``[in, in]`` copy)."""
        import torch.distributed as dist

        n = torch.tensor([self.n_tokens], dtype=torch.int64, device=self.H.device)
        self.H.mul_(self.n_tokens)
        dist.all_reduce(self.H, group=group)
        dist.all_reduce(n, group=group)
        self.n_tokens = int(n[0])
        self.H.div_(max(self.n_tokens, 1))


@dataclass
class GPTQResult:
    """Quantized weight (dequantized, float32, exactly on the grid of its scales) and scales.

    ``fake_quant(weight, spec, scale=scale, zero_point=zero_point, global_scale=global_scale)``
    returns ``weight`` bit for bit. ``scale``/``zero_point`` are in the stored layout of
    :mod:`lowbit.core.layout` (group: ``[out, in/g]``, channel: ``[out, 1]``, tensor: ``[]``),
    ``global_scale`` is NVFP4's, ``perm`` the act-order permutation (None without it),
    ``loss`` the proxy loss ``sum (w - q)^2 / d^2`` (``row_loss [out]``: its share of each
    output row, float64) and ``damp`` the value actually added to the diagonal of H (after
    retries).
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    global_scale: torch.Tensor | None
    perm: torch.Tensor | None
    loss: float
    damp: float
    row_loss: torch.Tensor | None = None


def rows_separable(spec: QuantSpec, shape: tuple[int, int]) -> bool:
    """Whether GPTQ of a weight ``[out, in]`` under ``spec`` treats every output row on its
    own (scales per row, or per group along the input): then the rows of several weights
    that share one Hessian can be quantized in one call, stacked, with the result each would
    get alone. Not for per-tensor scales, 2-D blocks, NVFP4 (global scale of the whole
    tensor) or ggml types."""
    if spec.ggml_type is not None or spec.granularity not in ("channel", "group"):
        return False
    bf = spec.block_format
    if bf is not None and bf.global_scale:
        return False
    return Layout(spec, shape).axis == (0 if spec.granularity == "channel" else 1)


def _column_spec(spec: QuantSpec) -> QuantSpec:
    """Spec of one column ``[out, 1]`` quantized with fixed per-row scales."""
    bf = spec.block_format
    return QuantSpec(format=bf.element if bf else spec.format, granularity="channel", axis=0,
                     symmetric=spec.symmetric, narrow_range=spec.narrow_range,
                     sym_scale=spec.sym_scale)


def _scales(x: torch.Tensor, spec: QuantSpec, nv_amax):
    """Scales of ``x`` for ``spec``: (per-element effective scale, per-element zero point or
    None, stored scale, stored zero point or None, NVFP4 global scale or None)."""
    lay, xv, s, zp, extra = compute_scales(x, spec, amax=nv_amax)

    def full(t):
        return lay.unview(t.expand_as(xv))

    stored = lay.to_natural(extra[0] if extra is not None else s)
    return (full(s), None if zp is None else full(zp), stored,
            None if zp is None else lay.to_natural(zp), None if extra is None else extra[1])


def ggml_block(spec: QuantSpec, in_features: int, name: str = "weight") \
        -> tuple[str, int, int] | None:
    """``(ggml type, sub-block size, super-block size)`` of a ``gguf_*`` weight spec (e.g.
    ``("Q4_K", 32, 256)``), None for any other spec. ``in_features`` must be a multiple of
    the super-block: :class:`ConfigError` otherwise (the mixes pick a fallback type)."""
    if not spec.format.startswith("gguf_"):
        return None
    from lowbit.core.ggml import ggml_type
    from lowbit.formats.ggml_blocks import GGML_BLOCKS

    t = ggml_type(spec)
    blk = GGML_BLOCKS[t]
    if in_features % blk.super:
        raise ConfigError(f"GPTQ {name}: {t} quantizes rows in blocks of {blk.super} values; "
                          f"in_features {in_features} is not a multiple of it (the GGUF mixes "
                          "give such tensors a fallback type)")
    return t, blk.sub, blk.super


class _GgmlScales:
    """Scales of a ``gguf_*`` weight ``[out, in]`` for GPTQ, one super-block at a time.

    ``search(k, w [out, super])``: the super-block ``k``'s scales from
    :func:`lowbit.core.ggml.search_scales` on ``w`` (the current, error-compensated
    weights) with the Hessian's diagonal as importance; ``round(w [out], col)``: column
    ``col`` rounded by :func:`lowbit.core.ggml.round_column` with its sub-block's scales;
    ``stored()``: ``(scale [out, in/sub], zero_point [out, in/sub] | None, global_scale
    [out, in/super(, 2)] | None)`` as ``fake_quant`` with fixed scales takes them. Without
    ``sweep`` every super-block is searched up front from ``W`` (act-order, static groups).
    """

    def __init__(self, gg, W: torch.Tensor, importance: torch.Tensor, sweep: bool):
        from lowbit.core.ggml import round_column, search_scales

        self.t, self.sub, self.sup = gg
        self.imp = importance
        self._search, self._round = search_scales, round_column
        n = W.shape[1] // self.sup
        self.parts: list = [None] * n
        if not sweep:
            s, z, gs = search_scales(W, self.t, importance)
            per = self.sup // self.sub
            for k in range(n):
                self.parts[k] = (s[:, k * per:(k + 1) * per],
                                 None if z is None else z[:, k * per:(k + 1) * per],
                                 None if gs is None else gs[:, k:k + 1])

    def search(self, k: int, w: torch.Tensor) -> None:
        """Scales of super-block ``k`` from its weights ``w [out, super]``."""
        imp = self.imp[k * self.sup:(k + 1) * self.sup]
        self.parts[k] = self._search(w.contiguous(), self.t, imp)

    def round(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Column ``col`` (values ``w [out]``) on the grid of its sub-block's scales."""
        s, z, _ = self.parts[col // self.sup]
        j = (col % self.sup) // self.sub
        return self._round(w, s[:, j], None if z is None else z[:, j], self.t)

    def stored(self):
        """``(scale, zero_point, global_scale)`` of the whole weight (stored layout)."""
        def cat(i):
            got = [p[i] for p in self.parts]
            return None if got[0] is None else torch.cat(got, dim=1).contiguous()
        return cat(0), cat(1), cat(2)


def _all_finite(t: torch.Tensor, elements: int = 1 << 20) -> bool:
    """Whether every element of ``t`` is finite, checked ~``elements`` at a time
    (``torch.isfinite`` of a whole ``[n, n]`` matrix allocates about twice its size)."""
    if t.ndim == 2 and not t.is_contiguous() and t.mT.is_contiguous():
        t = t.mT
    if t.ndim < 2 or not t.is_contiguous():
        return bool(torch.isfinite(t).all())
    rows = max(1, elements // max(1, t.shape[-1]))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


def cholesky_lower_inplace(A: torch.Tensor, block: int = 1024) -> bool:
    """Blocked Cholesky of the symmetric ``A [n, n]`` written into its lower triangle, the
    strict upper triangle left as it was (so a failed factorization can be undone with
    :func:`restore_lower`). Temporaries are ``[n, block]``, never a second ``[n, n]``.
    Returns False (``A``'s lower part then undefined) when ``A`` is not positive definite."""
    n = A.shape[0]
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        D = A[k0:k1, k0:k1]
        L11, info = torch.linalg.cholesky_ex(torch.tril(D) + torch.tril(D, -1).mT)
        if int(info) != 0 or not bool(torch.isfinite(L11).all()):
            return False
        D.copy_(L11 + torch.triu(D, 1))
        if k1 == n:
            break
        # L21 = A21 L11^-T, then the trailing lower triangle: A22 -= L21 L21^T
        L21 = torch.linalg.solve_triangular(L11, A[k1:, k0:k1].mT, upper=False).mT
        A[k1:, k0:k1] = L21
        for r0 in range(k1, n, block):
            r1 = min(n, r0 + block)
            rows = L21[r0 - k1:r1 - k1]
            if r0 > k1:
                A[r0:r1, k1:r0].addmm_(rows, L21[:r0 - k1].mT, alpha=-1)
            A[r0:r1, r0:r1].sub_(torch.tril(rows @ rows.mT))
        del L21
    return True


def restore_lower(A: torch.Tensor, diag: torch.Tensor, block: int = 1024) -> None:
    """Undo :func:`cholesky_lower_inplace`: the lower triangle from the kept strict upper
    one, the diagonal from ``diag [n]``."""
    n = A.shape[0]
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        A[k1:, k0:k1] = A[k0:k1, k1:].mT
        D = A[k0:k1, k0:k1]
        D.copy_(torch.triu(D, 1) + torch.triu(D, 1).mT)
    A.diagonal().copy_(diag)


def _inverse_hessian(H: torch.Tensor, percdamp: float, max_retries: int, name: str,
                     refill=None):
    """Upper Cholesky factor of ``(H + damp I)^-1`` (retrying with 10x damping), and damp.

    Everything happens in ``H``'s buffer (the caller's private copy), which the returned
    factor shares: the factorization is blocked (:func:`cholesky_lower_inplace`) and keeps
    ``H``'s upper triangle for a retry, the inverse and the upper factor are in place, so
    the peak is one ``[in, in]`` matrix plus ``[in, 1024]`` temporaries. A factorization
    that passes but whose inverse does not (rounding-level pivots of a nearly singular
    ``H``: how often depends on the CPU's BLAS) has overwritten ``H``: ``refill(H)`` writes
    it back for the retry when the caller still has it; without ``refill`` it is an error.
    """
    diag = torch.diag(H).clone()
    base = float(diag.abs().mean())  # mean(diag H) for any valid (PSD) Hessian
    base = base if base > 0 else 1.0
    damp = percdamp * base
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(max_retries + 1):
        H.diagonal().copy_(diag + damp)  # == H + damp * I, bit for bit
        ok = cholesky_lower_inplace(H)
        if ok and H.dtype == torch.float32:
            # (max/min diag L)^2 bounds cond(H) from below: past 1e8 (~1/eps) the float32
            # inverse is noise; damp more while H can still be restored
            d = H.diagonal().abs()
            ok = float(d.max() / d.min().clamp_min(1e-30)) ** 2 < 1e8
        if ok:
            H.tril_()
            torch.cholesky_inverse(H, out=H)
            torch.linalg.cholesky_ex(H, upper=True, out=(H, info))
            if int(info) == 0 and _all_finite(H):
                return H, damp
            if refill is None:
                raise CalibrationError(f"GPTQ {name}: the inverse Hessian [{H.shape[0]}x"
                                       f"{H.shape[0]}] is not positive definite in floating "
                                       f"point with damping {damp:.3g}; raise percdamp or use "
                                       "float64 Hessians")
            refill(H)
            what = "of the inverse Hessian"
        else:
            restore_lower(H, diag)
            what = "of the Hessian"
        new = damp * 10 if damp > 0 else 0.01 * base
        if attempt == max_retries:
            break
        warnings.warn(f"GPTQ {name}: Cholesky factorization {what} failed with damping "
                      f"{damp:.3g} ({damp / base:.3g} of its mean diagonal); retrying with "
                      f"{new:.3g}", RuntimeWarning, stacklevel=3)
        damp = new
    raise CalibrationError(f"GPTQ {name}: the Hessian [{H.shape[0]}x{H.shape[0]}] is not positive "
                           f"definite even with damping {damp:.3g} after {max_retries} retries; "
                           "calibrate with more (or more varied) data or raise percdamp")


def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec,
                         block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                         static_groups: bool = True, max_retries: int = 5,
                         name: str = "weight", overwrite_hessian: bool = False) -> GPTQResult:
    """GPTQ of ``weight [out, in]`` with the Hessian ``H [in, in]`` of its inputs, for ``spec``.

    See the module doc for the scales and act-order. ``name`` (e.g. the layer's) goes into
    warnings and errors. Raises :class:`CalibrationError` for a Hessian of the wrong shape,
    with NaN/Inf, or not positive definite after ``max_retries`` tenfold dampings (each retry
    warns), :class:`FormatError` for a weight with NaN/Inf, :class:`ConfigError` for bad
    options (a group size that does not divide ``in``, a dynamic spec...).

    Memory: the inverse Hessian is computed before the float32 copies of the weight are
    made: the peak is two ``[in, in]`` matrices (damped ``H`` and the factor, refined in
    place into the inverse's upper factor), then that factor and three or four float32
    ``[out, in]`` matrices (weights, scales, result) -- plus the caller's ``H`` unless
    ``overwrite_hessian=True``: then ``H`` (float32 or float64, on the weight's device) is
    consumed, overwritten and its memory released (the caller's tensor becomes empty).
    """
    if weight.ndim != 2:
        raise ConfigError(f"GPTQ {name}: expected a 2-D weight [out, in], got shape "
                          f"{list(weight.shape)}")
    out_f, in_f = weight.shape
    if tuple(H.shape) != (in_f, in_f):
        raise CalibrationError(f"GPTQ {name}: Hessian of shape {list(H.shape)}; expected "
                               f"[{in_f}, {in_f}] for a weight of shape [{out_f}, {in_f}]")
    if block_size < 1 or percdamp < 0 or max_retries < 0:
        raise ConfigError(f"GPTQ {name}: block_size must be >= 1, percdamp and max_retries >= 0 "
                          f"(got {block_size}, {percdamp}, {max_retries})")
    if spec.granularity == "token" or spec.dynamic:
        raise ConfigError(f"GPTQ {name}: spec {spec.short()} is dynamic; GPTQ needs a weight spec "
                          "with static scales")
    dev = weight.device
    if not _all_finite(weight.detach()):
        raise FormatError(f"GPTQ {name}: the weight contains NaN/Inf values; expected finite "
                          "numbers")
    given = H
    H = H.detach().to(dev, torch.float64 if H.dtype == torch.float64 else torch.float32,
                      copy=not overwrite_hessian)
    if not _all_finite(H):
        raise CalibrationError(f"GPTQ {name}: the Hessian contains NaN/Inf values (non-finite "
                               "calibration activations?)")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1

    gg = ggml_block(spec, in_f, name)  # (type, sub, super) of a gguf_* spec, else None
    if gg is not None:
        # the imatrix of this layer: mean x^2 per input channel (H = 2 mean x x^T)
        importance = (torch.diag(H) / 2).to(torch.float32, copy=True)
        bf, grouped, g = None, True, gg[2]
        col_spec = None
    else:
        lay = Layout(spec, (out_f, in_f))  # checks that the group size divides in_features
        bf = spec.block_format
        grouped = spec.granularity == "group" and lay.axis == 1
        g = spec.group_size if grouped else in_f
        col_spec = _column_spec(spec)
    sweep = grouped and not (act_order and static_groups)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        H = H[perm][:, perm]
    cols = perm.tolist() if perm is not None else list(range(in_f))
    pos_of = torch.argsort(perm) if perm is not None else torch.arange(in_f, device=dev)

    def refill(buf):  # the prepared H again, from the caller's (kept) matrix
        src = given.detach().to(dev, buf.dtype)
        src[dead, dead] = 1
        buf.copy_(src if perm is None else src[perm][:, perm])

    # the inverse first: the weight's float32 copies do not coexist with its temporaries
    U, damp = _inverse_hessian(H, percdamp, max_retries, name,  # in H's buffer
                               None if overwrite_hessian else refill)
    Hinv = U.to(torch.float32)
    if overwrite_hessian and Hinv.untyped_storage().data_ptr() != \
            given.untyped_storage().data_ptr():
        # consumed: its memory goes now, whoever still refers to it (when it is not the
        # buffer the inverse lives in: a float64 H, or a permuted copy for act-order)
        try:
            given.untyped_storage().resize_(0)
        except RuntimeError:  # storage not owned by torch (e.g. from numpy)
            pass
    del H, U, given

    W = weight.detach().to(torch.float32, copy=True)
    W[:, dead] = 0
    nv_amax = W.abs().amax() if bf is not None and bf.global_scale else None

    # per-element scales S (and zero points Z), transposed [in, out] so a column is a row
    if gg is not None:
        ggs = _GgmlScales(gg, W, importance, sweep)
        ST = ZT = scale = zp = gscale = None
    elif sweep:
        ST = torch.empty(in_f, out_f, device=dev)
        ZT = None if spec.symmetric else torch.empty(in_f, out_f, device=dev)
        scale = torch.empty(out_f, in_f // g, device=dev)
        zp = None if spec.symmetric else torch.empty(out_f, in_f // g, device=dev)
        gscale = None
    else:
        S, Z, scale, zp, gscale = _scales(W, spec, nv_amax)
        ST = S.t().contiguous()
        ZT = None if Z is None else Z.t().contiguous()
        del S, Z
    known = [not sweep] * (in_f // g)
    if perm is not None:
        W = W[:, perm]

    WT = W.t().contiguous()  # [in, out], in sweep order
    del W
    QT = torch.empty_like(WT)
    loss = torch.zeros(out_f, dtype=torch.float64, device=dev)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            k = col // g
            if not known[k]:
                # the first column of group k the sweep reaches: scales from the current
                # weights of all its columns (those past this lazy block get its updates now)
                pos = pos_of[k * g:(k + 1) * g]
                inb = pos < i2
                cur = torch.empty(g, out_f, device=dev)
                cur[inb] = W1[pos[inb] - i1]
                if not bool(inb.all()):
                    p = pos[~inb]
                    cur[~inb] = WT[p] - Hinv[i1:i2, p].t() @ Err1
                if gg is not None:
                    ggs.search(k, cur.t())
                else:
                    s_el, z_el, s_st, z_st, gs = _scales(cur.t(), spec, nv_amax)
                    ST[k * g:(k + 1) * g] = s_el.t()
                    scale[:, k:k + 1] = s_st
                    if ZT is not None:
                        ZT[k * g:(k + 1) * g] = z_el.t()
                        zp[:, k:k + 1] = z_st
                    gscale = gs
                known[k] = True
            w = W1[i]
            if gg is not None:
                q = ggs.round(w, col)
            else:
                q = fake_quant_fixed(w, col_spec, ST[col], None if ZT is None else ZT[col])
            QT[i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            Err1[i] = err
            W1[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)
        loss += Err1.double().square().sum(0)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)

    Q = QT.t()
    if perm is not None:
        Q = Q[:, pos_of]
    if gg is not None:  # float offsets and super-block scales, as lowbit.core.ggml stores them
        scale, zp, gscale = ggs.stored()
        return GPTQResult(weight=Q.contiguous(), scale=scale, zero_point=zp,
                          global_scale=gscale, perm=perm, loss=float(loss.sum()), damp=damp,
                          row_loss=loss)
    return GPTQResult(weight=Q.contiguous(), scale=scale.contiguous(),
                      zero_point=None if zp is None else zp.to(torch.int32).contiguous(),
                      global_scale=gscale, perm=perm, loss=float(loss.sum()), damp=damp,
                      row_loss=loss)
