"""quantize / dequantize / fake_quant: the one place where tensors are rounded.

``quantize(x, spec)`` returns a :class:`QTensor` (codes + scales), ``dequantize(qt)`` maps it
back, and ``fake_quant(x, spec)`` computes ``dequantize(quantize(x, spec))`` directly, bit
for bit the same, with a straight-through-estimator gradient.

Scales (AbsMax):

* symmetric integer: ``scale = amax / ((qmax - qmin) / 2)`` (``amax / 7.5`` for int4, codes
  -8..7, the GPTQ/compressed-tensors convention; ``sym_scale="qmax"``: ``amax / qmax``);
  float element formats: ``scale = amax / max``;
* affine integer: ``scale = (max(x, 0) - min(x, 0)) / (qmax - qmin)``, integer
  ``zero_point = clamp(qmin - round(min(x, 0) / scale))`` so real 0.0 is exact;
  ``q = clamp(round(x / scale) + zero_point)`` and ``x_hat = (q - zero_point) * scale``;
* NVFP4: ``global = amax(tensor) / (6 * 448)``, block scale ``e4m3(amax(block) / 6 / global)``
  (at least e4m3's smallest subnormal), ``x_hat = e2m1 * block_scale * global``;
* MX: ``scale = 2^(floor(log2 amax(block)) - emax(element))`` (an e8m0 value);
* ggml types (``gguf_*``): searched per block, see :mod:`lowbit.core.ggml`.

An all-zero unit gets scale 1 (or the smallest block scale) and codes 0, never NaN.
Inputs are computed in float32 and returned in their dtype (float16/bfloat16/float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import formats
from lowbit.core import ggml
from lowbit.core.layout import Layout
from lowbit.core.spec import QuantSpec
from lowbit.errors import ConfigError, FormatError

_E4M3 = formats.get("e4m3")
_TINY = torch.finfo(torch.float32).tiny
_SIGN_BIT = -(2**31)  # 0x80000000 as an int32


@dataclass
class QTensor:
    """A quantized tensor: uint8 ``codes`` (shape = original, unpacked) and its scales.

    ``scale`` (float32) and ``zero_point`` (int32, affine only) are in the stored layout of
    :mod:`lowbit.core.layout`; ``global_scale`` is NVFP4's per-tensor float32 scale.
    ggml types (``gguf_*``, see :mod:`lowbit.core.ggml`): ``codes`` are ggml's codes,
    ``scale``/``zero_point`` (float32) the effective sub-block scale/offset,
    ``global_scale`` the super scales, and ``fields`` ggml's fields for the exporter.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype
    global_scale: torch.Tensor | None = None
    fields: dict | None = None

    def to(self, device: "torch.device | str") -> "QTensor":
        """The same QTensor with every tensor (codes, scales, ggml fields) on ``device``."""
        def mv(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t

        return QTensor(mv(self.codes), mv(self.scale), mv(self.zero_point), self.spec,
                       self.shape, self.dtype, mv(self.global_scale),
                       None if self.fields is None else {k: mv(v) for k, v in
                                                         self.fields.items()})

    @property
    def element_format(self) -> formats.Format:
        """The format of the codes (ConfigError for ggml types: see :attr:`fields`)."""
        return self.spec.element_format

    def packed_codes(self) -> torch.Tensor:
        """Codes packed along the last axis (see :mod:`lowbit.formats.packing`); for ggml
        types, ggml's bytes of the whole weight (uint8 ``[O, I/super*type_size]``)."""
        if self.fields is not None:
            from lowbit.formats.ggml_blocks import pack

            return torch.from_numpy(pack(self.spec.ggml_type, self.fields))
        return formats.pack(self.codes, self.element_format.bits)

    def scale_codes(self) -> torch.Tensor | None:
        """uint8 codes of the scales for e4m3/e8m0 scale formats, else None."""
        if self.spec.scale_format in ("e4m3", "e8m0"):
            return formats.get(self.spec.scale_format).encode(self.scale)
        return None

    def nbytes(self) -> int:
        """Storage bytes: packed codes + scales (+ zero-points, + global scale)."""
        if self.spec.ggml_type is not None:
            t = ggml.ggml_type_info(self.spec.ggml_type)
            return self.codes.numel() // t.sup * t.block.type_size
        n = self.packed_codes().numel()
        n += self.scale.numel() * self.spec.scale_bits() // 8
        if self.zero_point is not None:
            n += -(-self.zero_point.numel() * self.element_format.bits // 8)
        if self.global_scale is not None:
            n += 4
        return n


def round_scale(s: torch.Tensor, scale_format: str) -> torch.Tensor:
    """A scale tensor (any shape, float32 units of the value per code step) as it is stored:
    zero (or negative) entries become 1, then the values are rounded to ``scale_format``
    (``fp32``, ``fp16``, ``bf16``, ``e8m0`` power of two, ``e4m3``) and kept above the
    smallest positive float32. Same shape, float32."""
    s = torch.where(s > 0, s, torch.ones_like(s))
    if scale_format == "fp16":
        s = s.clamp(6.2e-5, 65504.0).half().float()
    elif scale_format == "bf16":
        s = s.clamp_min(_TINY).bfloat16().float()
    elif scale_format == "e8m0":
        _, e = torch.frexp(s)
        exact = torch.ldexp(torch.full_like(s, 0.5), e) == s
        s = torch.ldexp(torch.ones_like(s), torch.where(exact, e - 1, e).clamp(-127, 127))
    elif scale_format == "e4m3":
        s = _E4M3.round(s).clamp_min(_E4M3.min_subnormal)
    return s.clamp_min(_TINY)


def _amax(lay: Layout, xv: torch.Tensor) -> torch.Tensor:
    # max(max x, -min x) is max |x| exactly (NaN propagates); two plain reductions read x
    # twice but allocate no |x| temporary and are several times faster on CPU than
    # abs().amax() or vector_norm(x, inf) (4096x4096, groups of 32: ~10x)
    dims = lay.reduce_dims
    if dims is None:
        return torch.maximum(xv.amax(), xv.amin().neg()).reshape([1] * xv.ndim)
    return torch.maximum(xv.amax(dim=dims, keepdim=True), xv.amin(dim=dims, keepdim=True).neg_())


def _check(v: torch.Tensor, what: str) -> None:
    # a sum is NaN/Inf when any element is, and is one reduction without a bool temporary
    # (~4x cheaper than isfinite().all() on CPU); only a non-finite sum (NaN/Inf inside, or
    # finite values overflowing float32) pays for the exact check
    if v.is_floating_point() and bool(torch.isfinite(v.sum())):
        return
    if not bool(torch.isfinite(v).all()):
        raise FormatError(f"{what} contains NaN/Inf values; expected finite numbers "
                          "(pass check_finite=False to skip this check)")


def compute_scales(x: torch.Tensor, spec: QuantSpec, amax=None, amin=None,
                   check_finite: bool = True, scale=None, zero_point=None, global_scale=None):
    """Scales of ``x`` for ``spec``: ``(layout, xv, scale_v, zero_point_v, extra)``.

    ``xv`` is ``x`` in float32 in the layout's view; ``scale_v`` and ``zero_point_v``
    broadcast against it. ``amax`` (and ``amin`` for affine specs) are calibrated statistics
    in the stored scale layout; None computes them from ``x``. For NVFP4, ``amax`` is the
    per-tensor amax that sets the global scale. ``scale`` (+ ``zero_point``, +
    ``global_scale`` for NVFP4) fixes the scales instead (stored layout), as GPTQ and
    checkpoints loaded from disk do.
    """
    lay = Layout(spec, x.shape)
    xf = x.float() if x.dtype != torch.float32 else x
    if spec.ggml_type is not None:
        _no_stats(spec, amax, amin)
        if check_finite:
            _check(xf, "input")
        fields = _ggml_fields(xf, spec, scale, zero_point, global_scale)
        s, zp, gs = ggml.fields_effective(spec.ggml_type, fields)
        return lay, lay.view(xf), lay.from_natural(s), \
            lay.from_natural(zp) if zp is not None else None, (fields, gs)
    if check_finite and (amax is not None or amin is not None or scale is not None):
        _check(xf, "input")
    xv = lay.view(xf)
    fmt = spec.element_format
    bf = spec.block_format
    zp = gs = None
    if scale is not None:
        s = lay.from_natural(scale)
        if zero_point is not None:
            zp = lay.from_natural(torch.as_tensor(zero_point).float())
        if bf is not None and bf.global_scale:
            if global_scale is None:
                raise FormatError(f"{spec.format}: a fixed scale needs its global_scale too")
            gs = torch.as_tensor(global_scale, dtype=torch.float32).reshape(())
            return lay, xv, s * gs, None, (s, gs)
        return lay, xv, s, zp, None
    if bf is None:
        if spec.symmetric:
            a = lay.from_natural(amax) if amax is not None else _amax(lay, xv)
            if check_finite and amax is None:
                _check(a, "input")
            denom = (fmt.qmax - fmt.qmin) / 2 if fmt.kind == "int" and \
                spec.sym_scale == "half_range" else fmt.max
            s = round_scale(a / denom, spec.scale_format)
        else:
            hi = lay.from_natural(amax) if amax is not None else lay.reduce_max(xv)
            lo = lay.from_natural(amin) if amin is not None else lay.reduce_amax(xv, True)
            if check_finite and (amax is None or amin is None):
                _check(hi - lo, "input")
            hi, lo = hi.clamp_min(0), lo.clamp_max(0)
            s = round_scale((hi - lo) / (fmt.qmax - fmt.qmin), spec.scale_format)
            zp = (fmt.qmin - torch.round(lo / s)).clamp(fmt.qmin, fmt.qmax)
        return lay, xv, s, zp, gs
    bamax = _amax(lay, xv)
    if check_finite:
        _check(bamax, "input")
    if bf.global_scale:
        t = torch.as_tensor(amax, dtype=torch.float32) if amax is not None else bamax.amax()
        gs = t.reshape(()) / (fmt.max * _E4M3.max)
        gs = torch.where(gs > 0, gs, torch.ones_like(gs)).clamp_min(_TINY)
        sb = _E4M3.round(bamax / fmt.max / gs).clamp_min(_E4M3.min_subnormal)
        return lay, xv, sb * gs, None, (sb, gs)
    _, e = torch.frexp(bamax)
    x_exp = torch.where(bamax > 0, e - 1 - fmt.emax, torch.full_like(e, -127)).clamp(-127, 127)
    s = torch.ldexp(torch.ones_like(bamax), x_exp)
    return lay, xv, s, None, None


def _no_stats(spec: QuantSpec, amax, amin) -> None:
    if amax is not None or amin is not None:
        raise FormatError(f"{spec.format}: ggml types search their own scales; calibrated "
                          "amax/amin do not apply (pass scale=... to fix the scales)")


def _ggml_fields(xf, spec, scale, zero_point, global_scale) -> dict:
    x2 = xf.reshape(-1, xf.shape[-1]) if xf.dim() != 2 else xf
    if scale is None:
        return ggml.quantize_fields(x2, spec.ggml_type)
    return ggml.fields_from_scales(x2, spec.ggml_type, scale, zero_point, global_scale)


def _round_owned(fmt: formats.Format, q: torch.Tensor) -> torch.Tensor:
    """``fmt.round(q)`` bit for bit, in place where the format allows it.

    ``q`` is a float32 temporary owned by the caller (fake_quant's ``x / s``): integer,
    torch-native FP8 and the other signed minifloats round it in place, which saves most
    full-size temporaries (each a fresh allocation, i.e. page faults, on CPU). Other formats
    (e8m0) fall back to ``fmt.round``. Must stay in step with ``IntFormat.round`` and
    ``FloatFormat.round``; the tests check fake_quant == dequantize(quantize) bit for bit.
    """
    if fmt.kind == "int":
        return q.round_().clamp_(fmt.qmin, fmt.qmax).add_(0.0)  # + 0.0: no -0 (see round)
    dt = getattr(fmt, "torch_dtype", None)
    if dt is not None:
        return q.copy_(q.clamp_(-fmt.max, fmt.max).to(getattr(torch, dt)))
    if fmt.kind == "float" and fmt.has_sign and fmt.subnormals and fmt.mbits <= 20:
        return _round_minifloat_(fmt, q)
    return fmt.round(q)


def _round_minifloat_(fmt: formats.FloatFormat, q: torch.Tensor) -> torch.Tensor:
    """Round float32 ``q`` in place to a signed minifloat with subnormals: nearest, ties to
    even, saturating at ``+-fmt.max``; ``FloatFormat.round`` bit for bit, -0 included.

    For ``|q|`` in the binade ``[2^e, 2^(e+1))`` (``e`` at least the format's ``emin``),
    ``c = 1.5 * 2^(e - mbits + 23)`` puts ``|q| + c`` in a float32 binade whose ulp is the
    format's quantum ``2^(e - mbits)``, so float32's own round-to-nearest-even rounds it there
    and subtracting ``c`` is exact. The sign bits are set back afterwards (a negative value
    that rounds to zero gives -0, as ``copysign`` does). NaN stays NaN.
    """
    qi = q.view(torch.int32)
    sign = qi & _SIGN_BIT
    q.abs_().clamp_(max=fmt.max)
    c = (qi & 0x7F800000).view(torch.float32)  # 2^floor(log2 |q|); 0 below float32 normals
    c.clamp_(min=fmt.min_normal).mul_(1.5 * 2.0 ** (23 - fmt.mbits))
    q.add_(c).sub_(c)
    qi.bitwise_or_(sign)
    return q


def _scaled(xv: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    y = xv / s
    return y.add_(zp) if zp is not None else y


def quantize(x: torch.Tensor, spec: QuantSpec, amax=None, amin=None,
             check_finite: bool = True, scale=None, zero_point=None,
             global_scale=None) -> QTensor:
    """Quantize ``x`` (any shape, float16/bfloat16/float32) to codes and scales.

    ``amax``/``amin``: calibrated statistics in the stored scale layout (see
    :func:`compute_scales`); None computes them from ``x`` (dynamic or weight).
    ``scale``/``zero_point``/``global_scale`` fix the scales instead (stored layout).
    Raises FormatError on NaN/Inf input (unless ``check_finite=False``).
    """
    if spec.ggml_type is not None:
        _no_stats(spec, amax, amin)
        xf = x.detach().float()
        if check_finite:
            _check(xf, "input")
        fields = _ggml_fields(xf, spec, scale, zero_point, global_scale)
        s, zp, gs = ggml.fields_effective(spec.ggml_type, fields)
        return QTensor(fields["q"].reshape(x.shape), s, zp, spec, tuple(x.shape), x.dtype, gs,
                       fields)
    lay, xv, s, zp, extra = compute_scales(x, spec, amax, amin, check_finite, scale,
                                           zero_point, global_scale)
    codes = lay.unview(spec.element_format.encode(_scaled(xv, s, zp)))
    if spec.block_format is not None and spec.block_format.global_scale:
        sb, gs = extra
        scale, gscale = lay.to_natural(sb), gs
    else:
        scale, gscale = lay.to_natural(s), None
    zpn = lay.to_natural(zp).to(torch.int32) if zp is not None else None
    return QTensor(codes.contiguous(), scale.contiguous(), zpn, spec, tuple(x.shape), x.dtype,
                   gscale)


def int_rows(x: torch.Tensor, spec: QuantSpec, amax=None,
             check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer values and scales of a 2-D activation ``x [M, K]`` (any float dtype) under a
    symmetric integer ``spec`` that quantizes per token (dynamic: ``amax`` None) or per
    tensor (static: ``amax`` the calibrated scalar amax).

    Returns ``(q [M, K] float32 holding integers in [qmin, qmax], scale [M, 1] or [1, 1]
    float32)``: the same codes and scales :func:`quantize` gives (``q`` is
    ``decode(codes)``), without its general layout bookkeeping, for decode-sized inputs of
    fused int8 kernels. ConfigError for any other spec; FormatError on NaN/Inf (as
    :func:`quantize`, unless ``check_finite=False``).
    """
    fmt = spec.element_format
    if fmt.kind != "int" or not fmt.is_signed or not spec.symmetric or \
            spec.block_format is not None or spec.ggml_type is not None or x.ndim != 2 or \
            (amax is None and (spec.granularity != "token" or not spec.dynamic)) or \
            (amax is not None and spec.granularity != "tensor"):
        raise ConfigError(f"int_rows takes a 2-D input and a symmetric signed int spec, "
                          f"dynamic per token or per tensor with its amax; got "
                          f"{spec.short()} on {x.ndim}-D input")
    xf = x.float()
    if amax is None:
        a = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg_())
        if check_finite:
            _check(a, "input")
    else:
        if check_finite:
            _check(xf, "input")
        a = torch.as_tensor(amax, dtype=torch.float32, device=x.device).reshape(1, 1)
    denom = (fmt.qmax - fmt.qmin) / 2 if spec.sym_scale == "half_range" else fmt.max
    s = round_scale(a / denom, spec.scale_format)
    return fmt.round(xf / s), s


def dequantize(qt: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Real values of a :class:`QTensor`, shape ``qt.shape``, in ``dtype`` (default its own)."""
    if qt.spec.ggml_type is not None:
        y = ggml.dequantize_ggml(qt.spec.ggml_type, qt.codes, qt.scale, qt.zero_point)
        return y.to(dtype or qt.dtype)
    lay = Layout(qt.spec, qt.shape)
    vals = lay.view(qt.spec.element_format.decode(qt.codes))
    s = lay.from_natural(qt.scale)
    if qt.global_scale is not None:
        s = s * qt.global_scale
    if qt.zero_point is not None:
        vals = vals - lay.from_natural(qt.zero_point.float())
    y = lay.unview(vals * s)
    return y.to(dtype or qt.dtype)


class _STE(torch.autograd.Function):
    """Straight-through estimator: gradient 1 inside the clipping range, 0 outside."""

    @staticmethod
    def forward(ctx, x, y, mask):  # noqa: D102
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (mask,) = ctx.saved_tensors
        return g * mask, None, None


def fake_quant_fixed(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                     zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant`` of float32 ``x`` with its scales already given per element: ``scale``
    (and the affine ``zero_point``, float) broadcast against ``x``, e.g. one column ``[out]``
    of a weight with the per-row scales of its group. The element format's rounding only (no
    layout, no statistics, no finiteness check): bit for bit what ``fake_quant`` computes
    once it has the scales, for the per-call cost of a few elementwise ops (GPTQ rounds one
    column at a time). Returns a new float32 tensor of ``x``'s shape; ggml types (whose
    rounding searches per sub-block) are refused with :class:`FormatError`."""
    if spec.ggml_type is not None:
        raise FormatError(f"fake_quant_fixed: {spec.format} rounds per ggml sub-block; "
                          "use lowbit.core.ggml.round_column")
    q = x / scale
    if zero_point is not None:
        q.add_(zero_point)
    q = _round_owned(spec.element_format, q)
    if zero_point is not None:
        q.sub_(zero_point)
    return q.mul_(scale)


def fake_quant(x: torch.Tensor, spec: QuantSpec, amax=None, amin=None,
               check_finite: bool = True, scale=None, zero_point=None,
               global_scale=None) -> torch.Tensor:
    """``dequantize(quantize(x, spec))`` bit for bit, same shape and dtype as ``x``.

    Differentiable with the straight-through estimator: the gradient w.r.t. ``x`` is the
    incoming gradient where ``x`` lies inside the clipping range (``[-max*scale, max*scale]``,
    or ``[(qmin-zp)*scale, (qmax-zp)*scale]`` for affine specs) and 0 outside.
    """
    if spec.ggml_type is not None:
        _no_stats(spec, amax, amin)
        if check_finite:
            _check(x.detach().float(), "input")
        return ggml.fake_quant_ggml(x, spec.ggml_type, scale, zero_point, global_scale)
    lay, xv, s, zp, _ = compute_scales(x.detach(), spec, amax, amin, check_finite, scale,
                                       zero_point, global_scale)
    fmt = spec.element_format
    q = _scaled(xv, s, zp)
    need_grad = x.requires_grad and torch.is_grad_enabled()
    if need_grad:
        mask = (q >= fmt.min) & (q <= fmt.max)
    q = _round_owned(fmt, q)
    if zp is not None:
        q = q.sub_(zp)
    y = lay.unview(q.mul_(s)).to(x.dtype)
    if need_grad:
        return _STE.apply(x, y, lay.unview(mask).to(x.dtype))
    return y
