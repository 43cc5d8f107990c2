"""lowbit codes and scales -> GGUF (ggml) block types, bit for bit.

A ggml block type stores 32 consecutive values of a row (along the input dimension of a
weight ``[out, in]``) with their own scale. lowbit's quantized weight maps to one without any
rounding when every run of 32 values shares one scale (and zero-point) and the scale is a
value of the block's scale format:

========= ================================ ============================================
ggml type block (32 values)                 lowbit weights that map exactly
========= ================================ ============================================
Q8_0      fp16 d, int8 q: ``x = d*q``       signed int2..int8, symmetric
Q4_0      fp16 d, 4-bit q: ``x = d*(q-8)``  signed int2..int4, symmetric
Q5_0      fp16 d, 5-bit q: ``x = d*(q-16)`` signed int5, symmetric
Q4_1      fp16 d, m: ``x = d*q + m``        int/uint 2..4 bit, affine, ``m = d*(qmin-zp)``
                                            exact in fp16 (else Q8_0, if ``q-zp`` fits)
Q5_1      fp16 d, m: ``x = d*q + m``        int/uint 5 bit, affine, likewise
MXFP4     e8m0 e, e2m1 q: ``x = 2^(e-127)*q`` fp4_e2m1 with power-of-two scales (``mxfp4``)
========= ================================ ============================================

"Shares one scale" holds for per-tensor and per-channel scales, for groups whose size is a
multiple of 32 along the input dimension and for 2-D blocks whose width is; "a value of
fp16" holds for ``scale_format: fp16`` (the check is made on the values, so fp32 scales
that happen to be fp16 numbers pass too). Nibble order of the 4-bit types (llama.cpp's):
byte ``j`` of a block holds value ``j`` in its low nibble and value ``j + 16`` in its high
nibble; Q5's fifth bits are a little-endian uint32, bit ``j`` for value ``j``.

Weights quantized with a ``gguf_*`` spec (``QuantSpec(format="gguf_q4_k")``: Q2_K..Q6_K,
IQ4_NL, IQ4_XS, NVFP4 and the legacy types) are already on a ggml grid: their
``QTensor.fields`` are packed by :func:`lowbit.formats.ggml_blocks.pack`, rows of every field
permuted together.

Everything else raises :class:`NotExact` with the reason; the exporter turns it into a
ConfigError or, when asked, requantizes the fake-quantized weight (see
:mod:`lowbit.export.gguf_requant`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from lowbit.core import QTensor
from lowbit.core.layout import Layout

QK = 32  # values per block of every type here

# ggml type name -> (block bytes, scale bytes before the codes)
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q4_1": 20, "Q5_1": 24, "MXFP4": 17}


class NotExact(Exception):
    """The QTensor has no exact ggml block type (the message says why)."""


def _full(qt: QTensor, t: torch.Tensor) -> torch.Tensor:
    """A stored-layout scale/zero-point broadcast to the full 2-D weight shape."""
    lay = Layout(qt.spec, qt.shape)
    view_shape = lay.view(torch.empty(qt.shape, dtype=torch.bool, device="meta")).shape
    return lay.unview(lay.from_natural(t.float()).expand(view_shape)).contiguous()


def _per_block(qt: QTensor, t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` (stored layout) as one value per block of 32: ``[out, in / 32]``."""
    spec = qt.spec
    o, i = qt.shape
    t = t.float()
    if spec.granularity == "tensor":
        return t.reshape(1, 1).expand(o, i // QK).contiguous()
    if spec.granularity == "channel" and spec.axis % 2 == 0:
        return t.reshape(o, 1).expand(o, i // QK).contiguous()
    if spec.granularity == "group" and spec.axis % 2 == 1 and spec.group_size % QK == 0:
        return t.reshape(o, i // spec.group_size).repeat_interleave(spec.group_size // QK, 1)
    full = _full(qt, t)
    o, i = full.shape
    blocks = full.reshape(o, i // QK, QK)
    first = blocks[..., :1]
    if not bool((blocks == first).all()):
        raise NotExact(f"its {what}s change inside runs of 32 values ({qt.spec.short()}); "
                       "ggml blocks hold 32 values with one scale")
    return first.squeeze(-1)


def _fp16_exact(v: torch.Tensor, what: str) -> np.ndarray:
    h = v.to(torch.float16)
    if not bool((h.float() == v).all()):
        bad = v[h.float() != v].flatten()[0].item()
        raise NotExact(f"its {what} {bad!r} is not a float16 number (ggml stores fp16 "
                       "scales; quantize with scale_format: fp16)")
    return h.numpy()


def gguf_spec_type(spec) -> str | None:
    """The ggml type name of a ``gguf_*`` spec (``gguf_q4_k`` -> ``"Q4_K"``), else None."""
    f = getattr(spec, "format", None)
    return f[5:].upper() if isinstance(f, str) and f.startswith("gguf_") else None


def pack_fields(kind: str, fields: dict, rows: torch.Tensor | None = None) -> np.ndarray:
    """ggml bytes ``uint8 [out, in/super*type_size]`` of ``fields`` (see
    :mod:`lowbit.formats.ggml_blocks`), the rows of every field reordered by ``rows``."""
    from lowbit.formats import ggml_blocks

    f = {k: v.detach().cpu() for k, v in fields.items()}
    if rows is not None:
        f = {k: v[rows.cpu()] for k, v in f.items()}
    return ggml_blocks.pack(kind, f)


def ggml_type_for(qt: QTensor) -> str:
    """The ggml type name lowbit's ``qt`` maps to exactly (raises NotExact otherwise).

    Only the spec is looked at; :func:`to_blocks` also checks the values.
    """
    spec = qt.spec
    kind = gguf_spec_type(spec)
    if kind is not None:
        return kind
    fmt = spec.element_format
    if len(qt.shape) != 2:
        raise NotExact(f"ggml weights are 2-D; got shape {list(qt.shape)}")
    if qt.shape[1] % QK:
        raise NotExact(f"its input dimension {qt.shape[1]} is not a multiple of 32")
    if spec.block_format is not None and spec.block_format.global_scale:
        raise NotExact(f"{spec.format} has a per-tensor global scale that no ggml type stores")
    if fmt.kind == "float":
        if fmt.name == "fp4_e2m1":
            return "MXFP4"
        raise NotExact(f"ggml has no {fmt.name} block type")
    if fmt.kind != "int":
        raise NotExact(f"ggml has no type for {fmt.name}")
    if spec.symmetric and fmt.qmin < 0:
        if fmt.bits <= 4:
            return "Q4_0"
        if fmt.bits == 5:
            return "Q5_0"
        return "Q8_0"
    # affine, or unsigned symmetric (zero-point 0)
    if fmt.bits <= 4:
        return "Q4_1"
    if fmt.bits == 5:
        return "Q5_1"
    if fmt.bits <= 7:
        return "Q8_0"
    raise NotExact(f"{fmt.name} {'affine' if not spec.symmetric else 'unsigned'} codes span "
                   "256 steps; ggml's 8-bit type Q8_0 has no offset")


def to_blocks(qt: QTensor, rows: torch.Tensor | None = None, widen: bool = False
              ) -> tuple[np.ndarray, str]:
    """``qt`` (a 2-D weight ``[out, in]``) as ggml blocks: ``(uint8 [out, in/32*B], type)``.

    ``rows`` reorders the rows (codes and their scales together), e.g. llama.cpp's Q/K
    permutation for rotary embeddings. ``widen``: store affine codes of <= 7 bits as Q8_0
    (``q - zero_point``, exact) even where Q4_1/Q5_1 would hold them, so that tensors
    stacked with one that needs Q8_0 (the experts of one MoE block) share its type. Raises
    NotExact when no type holds it exactly.
    """
    kind = ggml_type_for(qt)
    if gguf_spec_type(qt.spec) is not None:  # already ggml fields
        fields = getattr(qt, "fields", None)
        if not fields:
            raise NotExact(f"its {qt.spec.format} QTensor carries no ggml fields")
        return pack_fields(kind, fields, rows), kind
    fmt = qt.spec.element_format
    qt = replace(qt, codes=qt.codes.cpu(), scale=qt.scale.cpu(),
                 zero_point=None if qt.zero_point is None else qt.zero_point.cpu())
    codes = qt.codes
    d = _per_block(qt, qt.scale, "scale")
    zp = None
    if qt.zero_point is not None:
        zp = _per_block(qt, qt.zero_point, "zero-point")
    if rows is not None:
        codes, d = codes[rows], d[rows]
        zp = None if zp is None else zp[rows]
    o, i = codes.shape
    nb = i // QK
    if kind == "MXFP4":
        return _mxfp4(codes, d, o, nb), kind
    q = fmt.code_to_int(codes).reshape(o, nb, QK)  # int32 code values
    if kind in ("Q4_1", "Q5_1", "Q8_0") and (zp is not None or fmt.qmin >= 0):
        zpv = zp if zp is not None else torch.zeros_like(d)
        if kind == "Q8_0" or (widen and fmt.bits <= 7):  # q - zp fits int8
            return _q8_0(q - zpv.to(torch.int32).unsqueeze(-1), d, o, nb), "Q8_0"
        m = d * (fmt.qmin - zpv)  # x = d*(q - qmin) + d*(qmin - zp)
        try:
            mh = _fp16_exact(m, "offset d*(qmin - zero_point)")
        except NotExact as e:
            if fmt.bits <= 7:  # q - zp in [-(2^b - 1), 2^b - 1] fits int8: exact, bigger
                return _q8_0(q - zpv.to(torch.int32).unsqueeze(-1), d, o, nb), "Q8_0"
            raise e
        u = (q - fmt.qmin).to(torch.uint8)
        dh = _fp16_exact(d, "scale")
        return (_q4_1(u, dh, mh, o, nb) if kind == "Q4_1" else _q5_1(u, dh, mh, o, nb)), kind
    dh = _fp16_exact(d, "scale")
    if kind == "Q8_0":
        return _pack_q8_0(q, dh, o, nb), kind
    if kind == "Q4_0":
        return _q4_0((q + 8).to(torch.uint8), dh, o, nb), kind
    return _q5_0((q + 16).to(torch.uint8), dh, o, nb), kind


# --- block writers ------------------------------------------------------------------------
def _d_bytes(dh: np.ndarray, o: int, nb: int) -> np.ndarray:
    return np.ascontiguousarray(dh.astype(np.float16).reshape(o, nb, 1)).view(np.uint8)


def _nibbles(u: torch.Tensor) -> np.ndarray:
    """uint8 codes ``[o, nb, 32]`` (low 4 bits) -> ``[o, nb, 16]``: ``c[j] | c[j+16] << 4``."""
    u = u.numpy() & 0x0F
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def _high_bits(u: torch.Tensor) -> np.ndarray:
    """Fifth bits of 5-bit codes ``[o, nb, 32]`` as little-endian uint32 bytes ``[o, nb, 4]``."""
    bits = ((u.numpy() >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=-1, bitorder="little")


def _pack_q8_0(q: torch.Tensor, dh: np.ndarray, o: int, nb: int) -> np.ndarray:
    qs = q.to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([_d_bytes(dh, o, nb), qs], axis=-1).reshape(o, nb * 34)


def _q8_0(q: torch.Tensor, d: torch.Tensor, o: int, nb: int) -> np.ndarray:
    if int(q.min()) < -128 or int(q.max()) > 127:
        raise NotExact("its codes minus zero-points do not fit int8")
    return _pack_q8_0(q, _fp16_exact(d, "scale"), o, nb)


def _q4_0(u: torch.Tensor, dh: np.ndarray, o: int, nb: int) -> np.ndarray:
    return np.concatenate([_d_bytes(dh, o, nb), _nibbles(u)], axis=-1).reshape(o, nb * 18)


def _q5_0(u: torch.Tensor, dh: np.ndarray, o: int, nb: int) -> np.ndarray:
    parts = [_d_bytes(dh, o, nb), _high_bits(u), _nibbles(u)]
    return np.concatenate(parts, axis=-1).reshape(o, nb * 22)


def _q4_1(u, dh, mh, o, nb) -> np.ndarray:
    parts = [_d_bytes(dh, o, nb), _d_bytes(mh, o, nb), _nibbles(u)]
    return np.concatenate(parts, axis=-1).reshape(o, nb * 20)


def _q5_1(u, dh, mh, o, nb) -> np.ndarray:
    parts = [_d_bytes(dh, o, nb), _d_bytes(mh, o, nb), _high_bits(u), _nibbles(u)]
    return np.concatenate(parts, axis=-1).reshape(o, nb * 24)


def _mxfp4(codes: torch.Tensor, d: torch.Tensor, o: int, nb: int) -> np.ndarray:
    """e2m1 codes (bit patterns = ggml's kvalues_mxfp4 indices) with power-of-two scales."""
    mant, exp = torch.frexp(d)
    if not bool((mant == 0.5).all()):
        raise NotExact("its scales are not powers of two (MXFP4 stores e8m0 exponents)")
    e = exp - 1 + 127  # d = 2^(exp-1)
    if int(e.min()) < 0 or int(e.max()) > 254:
        raise NotExact("its scales are outside e8m0's range 2^-127 .. 2^127")
    eb = e.to(torch.uint8).numpy().reshape(o, nb, 1)
    qs = _nibbles(codes.reshape(o, nb, QK))
    return np.concatenate([eb, qs], axis=-1).reshape(o, nb * 17)
