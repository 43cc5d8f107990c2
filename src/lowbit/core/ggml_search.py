"""Importance-weighted scale search for ggml block types (all blocks at once, vectorized).

Objective, per ggml block: ``sum_i w_i (x_i - x_hat_i)^2`` with ``x_hat = s*c - zp`` (see
:mod:`lowbit.core.ggml_types`). Three stages, in the spirit of llama.cpp's
``make_qx_quants`` / ``make_qkx3_quants`` / ``make_qp_quants`` / IQ4 ``best_index`` search
(re-derived, not copied), with more candidates and a final refinement llama.cpp lacks:

1. float sub-block scales: for ``K`` candidate inverse scales per sub-block (a batched
   dimension; both ends of an asymmetric code range), codes = nearest, then the weighted
   least-squares scale (and, for affine types, the min jointly: a 2x2 solve, min kept <= 0
   where ggml keeps it so) given those codes; the best candidate wins;
2. the sub-scales quantized as ggml stores them: float16 ``d`` (and ``m``), or a float16
   super scale ``d`` with integer sub-scales, whose candidates are searched to minimise the
   error the scale change costs (``sum w c^2 * (s - d*isc)^2``), then refit by least squares;
   the mins are refit given the quantized scales and quantized the same way; NVFP4: nearest
   ue4m3;
3. alternating passes on the quantized parameters: codes = nearest given the scales; then
   the best integer sub-scales (and mins) given the codes, then ``d`` / ``dmin`` refit given
   those; every block keeps its best set (the error never increases); last, each
   sub-block's integer scale (and min; NVFP4: its ue4m3 byte) tries its neighbours +-1.
"""

from __future__ import annotations

import torch

from lowbit.core.ggml_types import GgmlType, fp16, nearest, nearest_, ue4m3_round

_EPS = 1e-30


def weights(t: GgmlType, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-element weights ``[N, sup]`` for blocks ``x [N, sup]``.

    ``importance`` (already ``[N, sup]``, floored by the caller) is used as is; None ->
    llama.cpp's data-free weighting of the type.
    """
    if importance is not None:
        return importance
    if t.free == "one":
        return torch.ones_like(x)
    if t.free == "abs":
        return x.abs()
    if t.free == "sq":
        return x * x
    av = (2 * (x * x).mean(-1, keepdim=True)).sqrt()
    return av + x.abs()


def _cands(k: int, span: float, device) -> torch.Tensor:
    return 1 + torch.linspace(-span, span, k, device=device)


def _search_sym(t: GgmlType, x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Float scale per sub-block ``x, w [B, n] -> s [B]`` (codes symmetric-ish around 0)."""
    i = x.abs().argmax(-1, keepdim=True)
    xm = x.gather(-1, i)
    zero = xm == 0
    xm = torch.where(zero, torch.ones_like(xm), xm)
    span = 1.2 / abs(t.cmin) if t.lut is None else 0.1
    f = _cands(k, span, x.device)
    tt = [t.cmin * f]
    if t.cmax != -t.cmin:
        tt.append(t.cmax * f)
    tt = torch.cat(tt)  # [K]
    c = nearest_(t, x.unsqueeze(1) * (tt.view(1, -1, 1) / xm.unsqueeze(-1)))  # [B, K, n]
    sxc = torch.bmm(c, (w * x).unsqueeze(-1)).squeeze(-1)
    scc = torch.bmm(c.square_(), w.unsqueeze(-1)).squeeze(-1)
    score = torch.where(scc > 0, sxc * sxc / scc.clamp_min(_EPS), torch.full_like(scc, -1.0))
    b = score.argmax(-1, keepdim=True)
    s = sxc.gather(-1, b) / scc.gather(-1, b).clamp_min(_EPS)
    return torch.where(zero, torch.zeros_like(s), s).squeeze(-1)


def _ls_affine(sw, sx, sl, sll, sxl, min_le0: bool):
    """Weighted least squares of ``s*c + m ~ x`` from the sums; returns ``(s, m)``."""
    den = sw * sll - sl * sl
    ok = den > 1e-12 * sw * sll.clamp_min(_EPS)
    s = torch.where(ok, (sw * sxl - sx * sl) / torch.where(ok, den, 1.0), 0.0)
    m = torch.where(ok, (sll * sx - sl * sxl) / torch.where(ok, den, 1.0), sx / sw.clamp_min(_EPS))
    if min_le0:
        pos = m > 0
        s = torch.where(pos, sxl / sll.clamp_min(_EPS), s)
        m = torch.where(pos, torch.zeros_like(m), m)
    s = s.clamp_min(0)
    return s, m


def _search_affine(t: GgmlType, x: torch.Tensor, w: torch.Tensor, k: int):
    """Float scale and min per sub-block: ``x, w [B, n] -> (s [B], m [B])``, ``x ~ s*c + m``."""
    mn = x.amin(-1, keepdim=True)
    mx = x.amax(-1, keepdim=True)
    if t.min_le0:
        mn = mn.clamp_max(0)
    rng = mx - mn
    flat = rng <= 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    # candidate steps around (max - min) / cmax, and the min shifted by up to half a step
    f = _cands(k, 1.0 / t.cmax, x.device)
    iscale = (t.cmax * f).view(1, -1) / rng  # [B, K]
    shift = torch.tensor([0.0, 0.3], device=x.device)
    lo = (mn + shift.view(1, -1) * rng / t.cmax)  # [B, S]
    if t.min_le0:
        lo = lo.clamp_max(0)
    y = (x.view(x.shape[0], 1, 1, -1) - lo.view(lo.shape[0], 1, -1, 1)) \
        * iscale.view(iscale.shape[0], -1, 1, 1)  # [B, K, S, n]
    c = nearest_(t, y).flatten(1, 2)  # [B, K*S, n]
    sw = w.sum(-1, keepdim=True)
    wx = w * x
    sx = wx.sum(-1, keepdim=True)
    sxx = (wx * x).sum(-1, keepdim=True)
    sl = torch.bmm(c, w.unsqueeze(-1)).squeeze(-1)
    sxl = torch.bmm(c, wx.unsqueeze(-1)).squeeze(-1)
    sll = torch.bmm(c.square_(), w.unsqueeze(-1)).squeeze(-1)
    s, m = _ls_affine(sw, sx, sl, sll, sxl, t.min_le0)
    err = sxx - 2 * s * sxl - 2 * m * sx + s * s * sll + 2 * s * m * sl + m * m * sw
    b = err.argmin(-1, keepdim=True)
    s, m = s.gather(-1, b), m.gather(-1, b)
    s = torch.where(flat, torch.zeros_like(s), s)
    m = torch.where(flat, mx, m)
    return s.squeeze(-1), m.squeeze(-1)


def quant_level(v: torch.Tensor, a: torch.Tensor, lo: int, hi: int, k: int = 24):
    """Float16 ``d [N, 1]`` and integers ``iv [N, J]`` in ``lo..hi`` with ``d*iv ~ v``.

    ``v [N, J]`` target sub-scales (or offsets), ``a [N, J]`` the weight of each one's
    squared error. Searches ``d`` over candidates mapping the extreme value to either end of
    the integer range, then refits ``d`` by weighted least squares given ``iv``.
    """
    if lo < 0:
        i = v.abs().argmax(-1, keepdim=True)
        vm = v.gather(-1, i)
        f = _cands(k, 1.5 / abs(lo), v.device)
        tt = torch.cat([lo * f, hi * f])
    else:
        vm = v.amax(-1, keepdim=True).clamp_min(0)
        tt = hi * _cands(k, 1.5 / hi, v.device)
    d = fp16(vm / tt.view(1, -1))  # [N, K]
    d = torch.cat([d, fp16(vm / (hi if lo >= 0 else lo))], -1)

    def fit(dd):  # dd [N, K] -> iv [N, K, J], err [N, K]
        safe = torch.where(dd == 0, torch.ones_like(dd), dd)
        iv = torch.round(v.unsqueeze(1) / safe.unsqueeze(-1)).clamp_(lo, hi)
        iv = torch.where(dd.unsqueeze(-1) == 0, torch.zeros_like(iv), iv)
        err = (a.unsqueeze(1) * (v.unsqueeze(1) - dd.unsqueeze(-1) * iv) ** 2).sum(-1)
        return iv, err

    iv, err = fit(d)
    b = err.argmin(-1, keepdim=True)
    d1 = d.gather(-1, b)
    iv1 = iv.gather(1, b.unsqueeze(-1).expand(-1, 1, iv.shape[-1])).squeeze(1)
    e1 = err.gather(-1, b)
    num = (a * v * iv1).sum(-1, keepdim=True)
    den = (a * iv1 * iv1).sum(-1, keepdim=True)
    d2 = fp16(torch.where(den > 0, num / den.clamp_min(_EPS), d1))
    iv2, e2 = fit(d2)
    better = e2 < e1
    return torch.where(better, d2, d1), torch.where(better, iv2.squeeze(1), iv1)


class Params:
    """Quantized parameters of ``N`` blocks (tensors ``[N, J]`` or ``[N, 1]``)."""

    def __init__(self, t: GgmlType, **kw):
        self.t = t
        self.p = kw  # level fp16: s (+ m); int: d, isc (+ dmin, imn); ue4m3: s, byte

    def effective(self):
        """``(s, zp)`` ``[N, J]`` float32 as ggml computes them (zp None when not affine)."""
        t, p = self.t, self.p
        if t.level == "int":
            s = p["d"] * p["isc"]
            zp = p["dmin"] * p["imn"] if t.affine else None
        else:
            s = p["s"]
            zp = -p["m"] if t.affine else None
        return s, zp

    def where(self, mask: torch.Tensor, other: "Params") -> "Params":
        """Blocks where ``mask [N]`` from ``self``, the others from ``other``."""
        out = {}
        for k, v in self.p.items():
            out[k] = torch.where(mask.view(-1, *([1] * (v.dim() - 1))), v, other.p[k])
        return Params(self.t, **out)


def round_codes(t: GgmlType, x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None,
                want_code: bool = False):
    """Nearest code values ``c`` of ``x`` given broadcasting ``s`` (and offset ``zp``):
    ``c = nearest((x + zp) / s)``, 0 where ``s == 0``. The one rounding rule of every gguf_*
    path (search, quantize, fake_quant with fixed scales, GPTQ columns)."""
    s = torch.where(s == 0, torch.full_like(s, float("inf")), s)  # x / inf = 0 -> code 0
    y = (x + zp) / s if zp is not None else x / s
    return nearest_(t, y, want_code)


def values(s: torch.Tensor, c: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """``s*c - zp`` (ggml's order of float32 operations)."""
    xh = s * c
    return xh - zp if zp is not None else xh


def _evaluate(t, x3, w3, prm: Params):
    s, zp = prm.effective()
    s3 = s.unsqueeze(-1)
    z3 = zp.unsqueeze(-1) if zp is not None else None
    c = round_codes(t, x3, s3, z3)
    e = values(s3, c, z3).sub_(x3).square_().mul_(w3)
    return c, e.sum((-1, -2))


def _propose(t: GgmlType, x3, w3, c, prm: Params) -> Params:
    """New parameters given codes ``c [N, J, n]`` (least squares, then ggml's rounding)."""
    wc = w3 * c
    scc = (wc * c).sum(-1)
    sxc = (wc * x3).sum(-1)
    p = prm.p
    if t.affine:
        sw = w3.sum(-1)
        sx = (w3 * x3).sum(-1)
        sc = wc.sum(-1)
        s_ls, m_ls = _ls_affine(sw, sx, sc, scc, sxc, t.min_le0)
    else:
        s_ls = torch.where(scc > 0, sxc / scc.clamp_min(_EPS), torch.zeros_like(scc))
    if t.level == "fp16":
        s_new = torch.where(scc > 0, fp16(s_ls), p["s"])
        if t.affine:
            return Params(t, s=s_new, m=fp16(m_ls))
        return Params(t, s=s_new)
    if t.level == "ue4m3":
        v, _ = ue4m3_round(s_ls)
        return Params(t, s=torch.where(scc > 0, v, p["s"]))
    d = p["d"]
    sd = torch.where(d == 0, torch.ones_like(d), d)
    isc = torch.round(s_ls / sd).clamp_(t.isc_lo, t.isc_hi)
    if not t.affine:
        num = (isc * sxc).sum(-1, keepdim=True)
        den = (isc * isc * scc).sum(-1, keepdim=True)
        d2 = fp16(torch.where(den > 0, num / den.clamp_min(_EPS), d))
        sd = torch.where(d2 == 0, torch.ones_like(d2), d2)
        isc = torch.round(s_ls / sd).clamp_(t.isc_lo, t.isc_hi)
        return Params(t, d=d2, isc=isc)
    dmin = p["dmin"]
    s_q = d * isc
    off = (-(sx - s_q * sc) / sw.clamp_min(_EPS)).clamp_min(0)  # offset = -min >= 0
    smin = torch.where(dmin == 0, torch.ones_like(dmin), dmin)
    imn = torch.round(off / smin).clamp_(0, t.mn_hi)
    o_q = dmin * imn
    # d given isc and the offsets: min sum w (d*isc*c - o - x)^2
    num = (isc * (sxc + o_q * sc)).sum(-1, keepdim=True)
    den = (isc * isc * scc).sum(-1, keepdim=True)
    d2 = fp16(torch.where(den > 0, num / den.clamp_min(_EPS), d))
    s2 = d2 * isc
    # dmin given imn: min sum w (s*c - dmin*mn - x)^2
    num = (imn * (s2 * sc - sx)).sum(-1, keepdim=True)
    den = (imn * imn * sw).sum(-1, keepdim=True)
    dmin2 = fp16(torch.where(den > 0, num / den.clamp_min(_EPS), dmin)).clamp_min(0)
    sd = torch.where(d2 == 0, torch.ones_like(d2), d2)
    isc = torch.round(s_ls / sd).clamp_(t.isc_lo, t.isc_hi)
    smin = torch.where(dmin2 == 0, torch.ones_like(dmin2), dmin2)
    off = (-(sx - d2 * isc * sc) / sw.clamp_min(_EPS)).clamp_min(0)
    imn = torch.round(off / smin).clamp_(0, t.mn_hi)
    return Params(t, d=d2, isc=isc, dmin=dmin2, imn=imn)


def _sub_errors(t, x3, w3, s, zp):
    """Per-sub-block weighted error ``[N, J]`` of effective ``s``/``zp`` ``[N, J]``."""
    s3 = s.unsqueeze(-1)
    z3 = zp.unsqueeze(-1) if zp is not None else None
    c = round_codes(t, x3, s3, z3)
    return values(s3, c, z3).sub_(x3).square_().mul_(w3).sum(-1)


def _neighbours(t: GgmlType, x3, w3, prm: Params) -> Params:
    """Each sub-block's integer scale (and min) or ue4m3 byte moved to the best of its
    neighbours given the super scales (sub-blocks are independent once those are fixed)."""
    p = dict(prm.p)
    if t.level == "ue4m3":
        from lowbit.core.ggml_types import _UE4M3_VALUES, ue4m3_round

        table = _UE4M3_VALUES.to(x3.device)
        _, byte = ue4m3_round(p["s"])
        cands = [table[(byte.long() + dl).clamp(0, table.numel() - 1)] for dl in (-1, 0, 1)]
        errs = torch.stack([_sub_errors(t, x3, w3, sv, None) for sv in cands])
        best = errs.argmin(0, keepdim=True)
        p["s"] = torch.stack(cands).gather(0, best).squeeze(0)
        return Params(t, **p)
    if t.level != "int":
        return prm
    opts = []
    for di in (-1, 0, 1):
        isc = (p["isc"] + di).clamp(t.isc_lo, t.isc_hi)
        for dm in ((-1, 0, 1) if t.affine else (0,)):
            imn = (p["imn"] + dm).clamp(0, t.mn_hi) if t.affine else None
            opts.append((isc, imn))
    errs = torch.stack([_sub_errors(t, x3, w3, p["d"] * i, p["dmin"] * m if m is not None
                                    else None) for i, m in opts])
    best = errs.argmin(0, keepdim=True)
    p["isc"] = torch.stack([i for i, _ in opts]).gather(0, best).squeeze(0)
    if t.affine:
        p["imn"] = torch.stack([m for _, m in opts]).gather(0, best).squeeze(0)
    return Params(t, **p)


def search_blocks(t: GgmlType, x: torch.Tensor, w: torch.Tensor, k: int = 8,
                  passes: int = 2) -> tuple[Params, torch.Tensor]:
    """Search the parameters of blocks ``x, w [N, sup]``; returns ``(params, codes c)``
    with ``c [N, J, sub]`` the nearest code values given the params."""
    n_blk, j, n = x.shape[0], t.sup // t.sub, t.sub
    x3, w3 = x.view(n_blk, j, n), w.view(n_blk, j, n)
    xs, ws = x3.reshape(-1, n), w3.reshape(-1, n)
    if t.affine:
        s, m = _search_affine(t, xs, ws, k)
        m = m.view(n_blk, j)
    else:
        s = _search_sym(t, xs, ws, k)
    s = s.view(n_blk, j)
    if t.level == "fp16":
        prm = Params(t, s=fp16(s), m=fp16(m)) if t.affine else Params(t, s=fp16(s))
    elif t.level == "ue4m3":
        prm = Params(t, s=ue4m3_round(s)[0])
    else:
        # curvature of each sub-block's error in its scale, given its codes at scale s
        off = -m if t.affine else None
        c = round_codes(t, x3, s.unsqueeze(-1), off.unsqueeze(-1) if off is not None else None)
        wc = w3 * c
        a = (wc * c).sum(-1)
        d, isc = quant_level(s, a, t.isc_lo, t.isc_hi)
        if t.affine:
            sw = w3.sum(-1)
            s_q = d * isc
            off = (-((w3 * x3).sum(-1) - s_q * wc.sum(-1)) / sw.clamp_min(_EPS)).clamp_min(0)
            dmin, imn = quant_level(off, sw, 0, t.mn_hi)
            prm = Params(t, d=d, isc=isc, dmin=dmin, imn=imn)
        else:
            prm = Params(t, d=d, isc=isc)
    best_c, best_err = _evaluate(t, x3, w3, prm)
    for it in range(passes + 1):
        if it == passes:  # last: each sub-block's best neighbouring sub-scale
            cand = _neighbours(t, x3, w3, prm)
            c, err = _evaluate(t, x3, w3, cand)
            better = err < best_err
            prm = cand.where(better, prm)
            best_c = torch.where(better.view(-1, 1, 1), c, best_c)
            break
        cand = _propose(t, x3, w3, best_c, prm)
        c, err = _evaluate(t, x3, w3, cand)
        better = err < best_err
        prm = cand.where(better, prm)
        best_c = torch.where(better.view(-1, 1, 1), c, best_c)
        best_err = torch.where(better, err, best_err)
    return prm, best_c
