"""ggml block types (llama.cpp's GGUF weights) as lowbit specs.

Spec formats ``gguf_q8_0``, ``gguf_q4_0``, ``gguf_q4_1``, ``gguf_q5_0``, ``gguf_q5_1``,
``gguf_q2_k``, ``gguf_q3_k``, ``gguf_q4_k``, ``gguf_q5_k``, ``gguf_q6_k``, ``gguf_iq4_nl``,
``gguf_iq4_xs``, ``gguf_nvfp4`` quantize a weight ``[O, I]`` (``I`` a multiple of the
type's block: 256 for K-quants and IQ4_XS, 64 for NVFP4, 32 otherwise) exactly as ggml
stores it. The content of one weight is its *fields* (:mod:`lowbit.formats.ggml_blocks`);
in a :class:`~lowbit.core.QTensor` the same content is also given as

* ``scale`` ``[O, I/sub]``: the effective sub-block scale ``s`` (``d``, ``d*(sc-off)``,
  ``ue4m3/2``), float32 as ggml computes it;
* ``zero_point`` ``[O, I/sub]`` float: the effective offset ``zp`` with ``x = s*c - zp``
  (``dmin*mn``; ``-m`` for Q4_1/Q5_1), None for types without one;
* ``global_scale``: K-quants' and IQ4_XS's super scales, ``d`` ``[O, I/256]`` or
  ``(d, dmin)`` ``[O, I/256, 2]``; None for the one-level types.

Those three are what :meth:`TensorQuantizer.set_fixed_scale` stores: fixed scales round to
nearest (:func:`round_column` per column for GPTQ), and must be exactly representable by
the type (else FormatError). The search (:func:`quantize_fields`) is in
:mod:`lowbit.core.ggml_search`.
"""

from __future__ import annotations

import torch

from lowbit.core.ggml_search import round_codes, search_blocks, values, weights
from lowbit.core.ggml_types import (GGML_TYPES, GgmlType, code_values, fp16, nearest,
                                    ue4m3_byte, ue4m3_value)
from lowbit.errors import ConfigError, FormatError

__all__ = [
    "GGML_FORMATS", "dequantize_ggml", "fake_quant_ggml", "fields_effective",
    "fields_from_scales", "ggml_type", "ggml_type_info", "quantize_fields", "round_column",
    "search_scales",
]

#: spec format name -> ggml type name
GGML_FORMATS: dict[str, str] = {"gguf_" + n.lower(): n for n in GGML_TYPES}

_CHUNK = 1 << 20  # elements of one batched temporary ([blocks, candidates, sub])
# The search is a long chain of small element-wise ops over cache-sized chunks: torch's
# intra-op threads gain little on them and lose 10x when the cores are shared (measured on
# 2 busy cores: 110 ns/element with 1 thread, 1300 with 2), so CPU searches run on one thread.
_SEARCH_THREADS = 1


def ggml_type(spec) -> str | None:
    """ggml type name (``"Q4_K"``) of a spec (or a format name), None when not a gguf_* one."""
    fmt = spec if isinstance(spec, str) else getattr(spec, "format", None)
    return GGML_FORMATS.get(fmt)


def ggml_type_info(name: str) -> GgmlType:
    """The :class:`GgmlType` of ``"Q4_K"`` or ``"gguf_q4_k"``; ConfigError if unknown."""
    t = GGML_TYPES.get(GGML_FORMATS.get(name, name)) if isinstance(name, str) else None
    if t is None:
        raise ConfigError(f"unknown ggml type {name!r}; expected one of: "
                          f"{', '.join(GGML_TYPES)} (or gguf_<type> in lower case)")
    return t


def _rows(w: torch.Tensor, t: GgmlType, what: str = "weight") -> torch.Tensor:
    if w.dim() < 1:
        raise ConfigError(f"gguf_{t.name.lower()}: the {what} needs a last dimension")
    n = w.shape[-1]
    if n % t.sup:
        raise ConfigError(f"gguf_{t.name.lower()}: last dimension (in_features) {n} of "
                          f"shape {list(w.shape)} is not a multiple of ggml's {t.name} block "
                          f"{t.sup}; choose another type for this tensor")
    return w.detach().float().reshape(-1, n)


def _importance(imp, shape: tuple[int, int]) -> torch.Tensor | None:
    if imp is None:
        return None
    imp = torch.as_tensor(imp, dtype=torch.float32)
    o, i = shape
    if imp.shape == (i,):
        imp = imp.view(1, i).expand(o, i)
    elif tuple(imp.shape) != (o, i):
        raise ConfigError(f"importance has shape {list(imp.shape)}; expected [{i}] (per input "
                          f"channel) or [{o}, {i}] for a weight of shape [{o}, {i}]")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ConfigError("importance must be finite and >= 0 (e.g. mean x^2 of the inputs)")
    top = imp.max()
    if top == 0:  # no input ever seen: every input counts the same
        return torch.ones_like(imp)
    # a floor of 1e-6 of the mean, so a block of dead inputs still gets sensible scales
    return imp.clamp_min(float(imp.mean()) * 1e-6)


def quantize_fields(w: torch.Tensor, name: str, importance=None) -> dict[str, torch.Tensor]:
    """Fields (see :mod:`lowbit.formats.ggml_blocks`) of weight ``w [O, I]`` as ggml ``name``.

    Minimises ``sum_i imp_i (w_i - w_hat_i)^2`` per block (see
    :mod:`lowbit.core.ggml_search`). ``importance``: ``[I]`` (per input channel, e.g. the
    imatrix ``mean x^2`` of calibration activations), ``[O, I]``, or None for llama.cpp's
    data-free weighting of that type. ``I`` must be a multiple of the type's block
    (ConfigError otherwise). Codes are nearest given the final scales.
    """
    t = ggml_type_info(name)
    x = _rows(w, t)
    o, i = x.shape
    if not bool(torch.isfinite(x).all()):
        raise FormatError(f"gguf_{t.name.lower()}: weight contains NaN/Inf values")
    imp = _importance(importance, (o, i))
    xb = x.reshape(-1, t.sup)
    ib = imp.reshape(-1, t.sup) if imp is not None else None
    step = max(1, _CHUNK // (t.sup * 16))
    parts = []
    threads = torch.get_num_threads()
    if x.device.type == "cpu":
        torch.set_num_threads(min(threads, _SEARCH_THREADS))
    try:
        for a in range(0, xb.shape[0], step):
            xc = xb[a:a + step]
            wc = weights(t, xc, ib[a:a + step] if ib is not None else None)
            parts.append(search_blocks(t, xc, wc))
    finally:
        torch.set_num_threads(threads)
    p = {k: torch.cat([pp[0].p[k] for pp in parts]) for k in parts[0][0].p}
    c = torch.cat([pp[1] for pp in parts]).reshape(o, i)
    return _fields(t, c, p, o, i)


def _fields(t: GgmlType, c: torch.Tensor, p: dict, o: int, i: int) -> dict[str, torch.Tensor]:
    q = nearest(t, c, want_code=True)[1]
    f = {"q": q.reshape(o, i)}
    if t.level == "fp16":
        f["d"] = p["s"].reshape(o, i // t.sub)
        if t.affine:
            f["m"] = p["m"].reshape(o, i // t.sub)
    elif t.level == "ue4m3":
        f["sc"] = ue4m3_byte(p["s"]).reshape(o, i // t.sub)
    else:
        sdt = torch.int8 if t.isc_lo + t.sc_off < 0 else torch.uint8
        f["sc"] = (p["isc"] + t.sc_off).to(sdt).reshape(o, i // t.sub)
        f["d"] = p["d"].reshape(o, i // t.sup)
        if t.affine:
            f["mn"] = p["imn"].to(torch.uint8).reshape(o, i // t.sub)
            f["dmin"] = p["dmin"].reshape(o, i // t.sup)
    return f


def fields_effective(name: str, fields: dict):
    """``(scale [O, I/sub], zero_point [O, I/sub] | None, global_scale | None)`` of fields."""
    t = ggml_type_info(name)
    j = t.sup // t.sub
    if t.level == "fp16":
        s = fields["d"].float()
        return s, (-fields["m"].float() if t.affine else None), None
    if t.level == "ue4m3":
        return ue4m3_value(fields["sc"]), None, None
    d = fields["d"].float().repeat_interleave(j, -1)
    s = d * (fields["sc"].to(torch.int32) - t.sc_off).float()
    if not t.affine:
        return s, None, fields["d"].float()
    dmin = fields["dmin"].float()
    zp = dmin.repeat_interleave(j, -1) * fields["mn"].float()
    return s, zp, torch.stack([fields["d"].float(), dmin], -1)


def _check_scales(t: GgmlType, shape, scale, zero_point, global_scale) -> dict:
    """Validate fixed scales (stored layout) for ``t``; returns the scale fields."""
    o, i = shape
    tag = f"gguf_{t.name.lower()}"
    s = torch.as_tensor(scale, dtype=torch.float32)
    if tuple(s.shape) != (o, i // t.sub):
        raise FormatError(f"{tag}: fixed scale has shape {list(s.shape)}; expected "
                          f"[{o}, {i // t.sub}] (one per {t.sub} columns)")
    if t.affine and zero_point is None:
        raise FormatError(f"{tag}: a fixed scale needs its zero_point (offset) too")
    if not t.affine and zero_point is not None:
        raise FormatError(f"{tag} has no offset; got a zero_point")
    zp = torch.as_tensor(zero_point, dtype=torch.float32) if zero_point is not None else None
    if zp is not None and zp.shape != s.shape:
        raise FormatError(f"{tag}: zero_point has shape {list(zp.shape)}, expected "
                          f"{list(s.shape)}")
    f: dict = {}
    if t.level == "fp16":
        if not torch.equal(fp16(s), s) or (zp is not None and not torch.equal(fp16(zp), zp)):
            raise FormatError(f"{tag}: fixed scales/offsets must be float16 values")
        f["d"] = s
        if t.affine:
            f["m"] = -zp
        return f
    if t.level == "ue4m3":
        b = ue4m3_byte(s)
        if b is None:
            raise FormatError(f"{tag}: fixed scales must be NVFP4 ue4m3 scale values")
        f["sc"] = b
        return f
    if global_scale is None:
        raise FormatError(f"{tag}: a fixed scale needs its global_scale (super scales) too")
    g = torch.as_tensor(global_scale, dtype=torch.float32)
    want = (o, i // t.sup, 2) if t.affine else (o, i // t.sup)
    if tuple(g.shape) != want:
        raise FormatError(f"{tag}: global_scale has shape {list(g.shape)}, expected "
                          f"{list(want)}")
    j = t.sup // t.sub

    def ints(v, dd, lo, hi, what):
        dr = dd.repeat_interleave(j, -1)
        iv = torch.where(dr == 0, torch.zeros_like(v),
                         torch.round(v / torch.where(dr == 0, torch.ones_like(dr), dr)))
        if not torch.equal(dr * iv, v) or bool((iv < lo).any()) or bool((iv > hi).any()):
            raise FormatError(f"{tag}: fixed {what} is not super scale * an integer in "
                              f"{lo}..{hi} for every sub-block")
        return iv

    d = g[..., 0] if t.affine else g
    if not torch.equal(fp16(d), d):
        raise FormatError(f"{tag}: global_scale must hold float16 values")
    isc = ints(s, d, t.isc_lo, t.isc_hi, "scale")
    f["sc"] = (isc + t.sc_off).to(torch.int8 if t.isc_lo + t.sc_off < 0 else torch.uint8)
    f["d"] = d
    if t.affine:
        dmin = g[..., 1]
        if not torch.equal(fp16(dmin), dmin):
            raise FormatError(f"{tag}: global_scale must hold float16 values")
        f["mn"] = ints(zp, dmin, 0, t.mn_hi, "zero_point").to(torch.uint8)
        f["dmin"] = dmin
    return f


def fields_from_scales(w: torch.Tensor, name: str, scale, zero_point=None,
                       global_scale=None) -> dict[str, torch.Tensor]:
    """Fields of ``w [O, I]`` rounded to nearest with fixed scales (stored layout)."""
    t = ggml_type_info(name)
    x = _rows(w, t)
    o, i = x.shape
    f = _check_scales(t, (o, i), scale, zero_point, global_scale)
    s = torch.as_tensor(scale, dtype=torch.float32)
    zp = torch.as_tensor(zero_point, dtype=torch.float32) if zero_point is not None else None
    xv = x.view(o, i // t.sub, t.sub)
    _, q = round_codes(t, xv, s.unsqueeze(-1), zp.unsqueeze(-1) if zp is not None else None,
                       want_code=True)
    f["q"] = q.reshape(o, i)
    return {k: f[k] for k in t.block.field_names}


def search_scales(w: torch.Tensor, name: str, importance=None):
    """Searched ``(scale [O, I/sub], zero_point [O, I/sub] | None, global_scale | None)`` of
    ``w [O, n*super]`` (stored layout, see the module doc), for GPTQ's per-group scales."""
    return fields_effective(name, quantize_fields(w, name, importance))


def round_column(w: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None,
                 name: str) -> torch.Tensor:
    """One column ``w [O]`` rounded with its sub-block's scale ``s [O]`` (offset ``zp [O]``):
    ``x_hat [O]`` float32, bit for bit what :func:`fake_quant_ggml` gives that column."""
    t = ggml_type_info(name)
    x = w.float()
    s = s.float()
    zp = zp.float() if zp is not None else None
    return values(s, round_codes(t, x, s, zp), zp)


def dequantize_ggml(spec_name: str, codes: torch.Tensor, scale: torch.Tensor,
                    zero_point: torch.Tensor | None) -> torch.Tensor:
    """Values ``[..., I]`` float32 of codes ``q`` with effective scales (stored layout)."""
    t = ggml_type_info(spec_name)
    x = codes.reshape(-1, codes.shape[-1])
    o, i = x.shape
    c = code_values(t, x).view(o, i // t.sub, t.sub)
    zp = zero_point.float().reshape(o, -1).unsqueeze(-1) if zero_point is not None else None
    y = values(scale.float().reshape(o, -1).unsqueeze(-1), c, zp)
    return y.reshape(codes.shape)


def fake_quant_ggml(x: torch.Tensor, name: str, scale=None, zero_point=None,
                    global_scale=None) -> torch.Tensor:
    """``dequantize(quantize(x))`` for a ggml type, same shape/dtype as ``x``; fixed
    ``scale`` (+ ``zero_point``, ``global_scale``) rounds to nearest with them, None searches
    them (data-free). Straight-through gradient inside the code range, 0 outside."""
    t = ggml_type_info(name)
    x2 = _rows(x, t)
    o, i = x2.shape
    if scale is None:
        if not bool(torch.isfinite(x2).all()):
            raise FormatError(f"gguf_{t.name.lower()}: input contains NaN/Inf values")
        s, zp, _ = fields_effective(name, quantize_fields(x2, name))
    else:
        _check_scales(t, (o, i), scale, zero_point, global_scale)
        s = torch.as_tensor(scale, dtype=torch.float32)
        zp = torch.as_tensor(zero_point, dtype=torch.float32) if zero_point is not None \
            else None
    s3 = s.to(x2.device).unsqueeze(-1)
    z3 = zp.to(x2.device).unsqueeze(-1) if zp is not None else None
    xv = x2.view(o, i // t.sub, t.sub)
    c = round_codes(t, xv, s3, z3)
    y = values(s3, c, z3).reshape(x.shape).to(x.dtype)
    if x.requires_grad and torch.is_grad_enabled():
        from lowbit.core.quant import _STE

        yv = (xv + z3 if z3 is not None else xv) / torch.where(s3 == 0, torch.ones_like(s3), s3)
        mask = (s3 != 0) & (yv >= t.cmin) & (yv <= t.cmax)
        return _STE.apply(x, y, mask.reshape(x.shape).to(x.dtype))
    return y
