"""ggml's block-quantized weight types as data: fields, exact dequantization, byte layout.

A ggml-typed weight ``[O, I]`` (``I`` = in_features, the row length ggml blocks along) is
described here by its *fields*, a dict of torch tensors holding the integer codes and the
float16 scales of every block, before they are packed into ggml's bytes:

========  ===  =====  ==============================================  ==========================
type      sub  super  fields (range)                                  element value (float32)
========  ===  =====  ==============================================  ==========================
Q8_0      32   32     q int8 -128..127, d                             q*d
Q4_0      32   32     q 0..15, d                                      d*(q-8)
Q4_1      32   32     q 0..15, d, m                                   d*q + m
Q5_0      32   32     q 0..31, d                                      d*(q-16)
Q5_1      32   32     q 0..31, d, m                                   d*q + m
Q2_K      16   256    q 0..3, sc 0..15, mn 0..15, d, dmin             (d*sc)*q - (dmin*mn)
Q3_K      16   256    q 0..7, sc 0..63, d                             (d*(sc-32))*(q-4)
Q4_K      32   256    q 0..15, sc 0..63, mn 0..63, d, dmin            (d*sc)*q - (dmin*mn)
Q5_K      32   256    q 0..31, sc 0..63, mn 0..63, d, dmin            (d*sc)*q - (dmin*mn)
Q6_K      16   256    q 0..63, sc int8 -128..127, d                   (d*sc)*(q-32)
IQ4_NL    32   32     q 0..15 (index into KVALUES_IQ4NL), d           d*kv[q]
IQ4_XS    32   256    q 0..15 (index), sc 0..63, d                    (d*(sc-32))*kv[q]
NVFP4     16   64     q 0..15 (e2m1 code), sc 0..126 (ue4m3 byte)     ue4m3(sc)/2 * (2*e2m1[q])
========  ===  =====  ==============================================  ==========================

Shapes: ``q`` ``[O, I]``; ``sc``/``mn`` ``[O, I/sub]``; ``d``/``dmin`` ``[O, I/super]``;
``m`` ``[O, I/32]``. ``d``, ``dmin`` and ``m`` are float32 tensors holding float16 values
(finite, any sign). Integer fields come back from :func:`unpack` as ``uint8`` (``int8`` for
Q8_0 ``q`` and Q6_K ``sc``); any integer dtype in range is accepted as input.

The element values are those of ``gguf.quants.dequantize`` (the `gguf` package, the
reference used to test this module), computed with the same float32 operations in the same
order, so :func:`dequantize` equals it bit for bit. Every product above is exact in float32
(a float16 scale has 11 significant bits, the integer factors' product, e.g. ``sc*(q-32)``,
at most 12), so only the final ``+ m`` / ``- (dmin*mn)`` rounds: the order of the
multiplications never changes a bit, the terms added do. NVFP4 scale bytes are ue4m3 as
``ggml_fp32_to_ue4m3`` writes them (0..0x7E; 0x7F, ggml's other zero, and bytes >= 0x80 are
rejected). :func:`pack`/:func:`unpack` (in :mod:`lowbit.formats.ggml_pack`) convert fields
to and from ggml's bytes (the ``block_*`` structs of ggml-common.h).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import FormatError

__all__ = [
    "GGML_BLOCKS", "GgmlBlock", "GgmlField", "KVALUES_IQ4NL", "KVALUES_NVFP4", "block",
    "check_fields", "dequantize", "pack", "unpack",
]

#: IQ4_NL / IQ4_XS non-linear code book (``kvalues_iq4nl`` in ggml-common.h).
KVALUES_IQ4NL: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10,
                                  1, 13, 25, 38, 53, 69, 89, 113)
#: NVFP4 element values, e2m1 doubled (``kvalues_mxfp4`` in ggml-common.h).
KVALUES_NVFP4: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)

#: Largest NVFP4 scale byte ggml writes (ue4m3 448); 0x7F decodes to 0 and is refused.
NVFP4_SCALE_MAX = 0x7E


@dataclass(frozen=True)
class GgmlField:
    """One field of a ggml block type.

    ``per``: input columns per value (1 for codes, ``sub`` for sub-block scales, ``super``
    for super-block scales). ``lo``/``hi``: inclusive integer range, ``None`` for a float16
    scale. ``dtype``: the torch dtype :func:`unpack` returns.
    """

    name: str
    per: int
    lo: int | None
    hi: int | None
    dtype: torch.dtype

    @property
    def is_float(self) -> bool:
        """True for a float16-valued scale (d, dmin, m)."""
        return self.lo is None


@dataclass(frozen=True)
class GgmlBlock:
    """Facts of one ggml block type.

    ``sub``: columns sharing one sub-block scale; ``super``: ggml's block size (columns per
    block of ``type_size`` bytes); ``ggml_type``: the ``GGMLQuantizationType`` id;
    ``fields``: the fields, in the order of the table in the module docstring.
    """

    name: str
    sub: int
    super: int
    type_size: int
    ggml_type: int
    fields: tuple[GgmlField, ...]

    @property
    def field_names(self) -> tuple[str, ...]:
        """Names of the fields, e.g. ``('q', 'sc', 'mn', 'd', 'dmin')``."""
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> GgmlField:
        """The field called ``name`` (FormatError if this type has none)."""
        for f in self.fields:
            if f.name == name:
                return f
        raise FormatError(f"ggml type {self.name} has no field {name!r}; "
                          f"fields: {', '.join(self.field_names)}")

    def code_range(self, name: str) -> tuple[int, int]:
        """Inclusive integer range ``(lo, hi)`` of integer field ``name``."""
        f = self.field(name)
        if f.is_float:
            raise FormatError(f"ggml type {self.name} field {name!r} is a float16 scale, "
                              "not an integer code")
        return f.lo, f.hi


_U8, _I8, _F32 = torch.uint8, torch.int8, torch.float32


def _q(hi: int, lo: int = 0, dtype: torch.dtype = _U8) -> GgmlField:
    return GgmlField("q", 1, lo, hi, dtype)


def _f(name: str, per: int) -> GgmlField:
    return GgmlField(name, per, None, None, _F32)


def _i(name: str, per: int, hi: int, lo: int = 0, dtype: torch.dtype = _U8) -> GgmlField:
    return GgmlField(name, per, lo, hi, dtype)


# Block and type sizes as gguf.constants.GGML_QUANT_SIZES has them (tests check equality);
# written out so the package does not need gguf (a test extra) at run time.
GGML_BLOCKS: dict[str, GgmlBlock] = {b.name: b for b in (
    GgmlBlock("Q8_0", 32, 32, 34, 8, (_q(127, -128, _I8), _f("d", 32))),
    GgmlBlock("Q4_0", 32, 32, 18, 2, (_q(15), _f("d", 32))),
    GgmlBlock("Q4_1", 32, 32, 20, 3, (_q(15), _f("d", 32), _f("m", 32))),
    GgmlBlock("Q5_0", 32, 32, 22, 6, (_q(31), _f("d", 32))),
    GgmlBlock("Q5_1", 32, 32, 24, 7, (_q(31), _f("d", 32), _f("m", 32))),
    GgmlBlock("Q2_K", 16, 256, 84, 10,
              (_q(3), _i("sc", 16, 15), _i("mn", 16, 15), _f("d", 256), _f("dmin", 256))),
    GgmlBlock("Q3_K", 16, 256, 110, 11, (_q(7), _i("sc", 16, 63), _f("d", 256))),
    GgmlBlock("Q4_K", 32, 256, 144, 12,
              (_q(15), _i("sc", 32, 63), _i("mn", 32, 63), _f("d", 256), _f("dmin", 256))),
    GgmlBlock("Q5_K", 32, 256, 176, 13,
              (_q(31), _i("sc", 32, 63), _i("mn", 32, 63), _f("d", 256), _f("dmin", 256))),
    GgmlBlock("Q6_K", 16, 256, 210, 14, (_q(63), _i("sc", 16, 127, -128, _I8), _f("d", 256))),
    GgmlBlock("IQ4_NL", 32, 32, 18, 20, (_q(15), _f("d", 32))),
    GgmlBlock("IQ4_XS", 32, 256, 136, 23, (_q(15), _i("sc", 32, 63), _f("d", 256))),
    GgmlBlock("NVFP4", 16, 64, 36, 40, (_q(15), _i("sc", 16, NVFP4_SCALE_MAX))),
)}


def block(name: str) -> GgmlBlock:
    """The :class:`GgmlBlock` of ggml type ``name`` (``"Q4_K"``); FormatError if unknown."""
    b = GGML_BLOCKS.get(name) if isinstance(name, str) else None
    if b is None:
        raise FormatError(f"unknown ggml block type {name!r}; known: {', '.join(GGML_BLOCKS)}")
    return b


def check_shape(b: GgmlBlock, n_rows: int, n_cols: int) -> None:
    """FormatError unless ``n_cols`` is a positive multiple of ``b.super`` (``n_rows`` >= 0)."""
    if n_cols <= 0 or n_cols % b.super != 0:
        raise FormatError(f"ggml type {b.name}: row length (in_features) {n_cols} is not a "
                          f"positive multiple of its block size {b.super}")
    if n_rows < 0:
        raise FormatError(f"ggml type {b.name}: negative row count {n_rows}")


def check_fields(name: str, fields: dict) -> dict[str, torch.Tensor]:
    """Validate ``fields`` of ggml type ``name``; return them as torch tensors (same dtypes).

    Checks: exactly the type's field names; every tensor 2-D ``[O, I/per]`` with one ``O``
    and ``I`` a multiple of the block; integer fields of an integer dtype within their
    range; float fields floating, finite and exactly float16-representable. One-line
    FormatError naming the type, field and what was expected otherwise.
    """
    b = block(name)
    if not isinstance(fields, dict):
        raise FormatError(f"ggml type {name}: fields must be a dict of tensors "
                          f"{list(b.field_names)}, got {type(fields).__name__}")
    keys, want = set(fields), set(b.field_names)
    if keys != want:
        raise FormatError(f"ggml type {name}: fields {sorted(keys)} do not match the expected "
                          f"{list(b.field_names)} (missing {sorted(want - keys)}, "
                          f"unknown {sorted(keys - want)})")
    out = {k: torch.as_tensor(fields[k]) for k in b.field_names}
    q = out["q"]
    if q.dim() != 2:
        raise FormatError(f"ggml type {name}: field 'q' must be 2-D [O, I], got shape "
                          f"{tuple(q.shape)}")
    n_rows, n_cols = q.shape
    check_shape(b, n_rows, n_cols)
    for f in b.fields:
        t = out[f.name]
        shape = (n_rows, n_cols // f.per)
        if tuple(t.shape) != shape:
            raise FormatError(f"ggml type {name}: field {f.name!r} has shape "
                              f"{tuple(t.shape)}, expected {shape} ([O, I/{f.per}] for "
                              f"q of shape {(n_rows, n_cols)})")
        if f.is_float:
            if not t.is_floating_point():
                raise FormatError(f"ggml type {name}: field {f.name!r} must be a float tensor "
                                  f"holding float16 values, got {t.dtype}")
            t32 = t.to(torch.float32)
            if t.numel() and not bool(torch.isfinite(t32).all()):
                raise FormatError(f"ggml type {name}: field {f.name!r} has non-finite values")
            if t.numel() and not torch.equal(t32.to(torch.float16).to(torch.float32), t32):
                bad = t32[t32.to(torch.float16).to(torch.float32) != t32][0].item()
                raise FormatError(f"ggml type {name}: field {f.name!r} holds {bad!r}, which "
                                  "is not a float16 value (round it with .half() first)")
            out[f.name] = t32
        else:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise FormatError(f"ggml type {name}: field {f.name!r} must be an integer "
                                  f"tensor, got {t.dtype}")
            if t.numel():
                lo, hi = int(t.min()), int(t.max())
                if lo < f.lo or hi > f.hi:
                    raise FormatError(f"ggml type {name}: field {f.name!r} has values in "
                                      f"[{lo}, {hi}], expected {f.lo}..{f.hi}")
    return out


def _ue4m3_table() -> torch.Tensor:
    """float32 [256]: NVFP4 scale byte -> ue4m3 value * 0.5, as gguf's ue4m3_to_fp32."""
    x = np.arange(256, dtype=np.uint8)
    exp = (x >> 3).astype(np.int32) & 0xF
    man = (x & 0x7).astype(np.float32)
    raw = np.where(exp == 0, man * np.float32(2.0 ** -9),
                   (np.float32(1.0) + man / np.float32(8.0))
                   * np.float32(2.0) ** (exp.astype(np.float32) - np.float32(7)))
    val = np.where((x == 0) | (x == 0x7F), np.float32(0.0), raw * np.float32(0.5))
    return torch.from_numpy(val.astype(np.float32))


_UE4M3 = _ue4m3_table()
_KV_IQ4 = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)
_KV_NVFP4 = torch.tensor(KVALUES_NVFP4, dtype=torch.float32)


def dequantize(name: str, fields: dict) -> torch.Tensor:
    """Element values ``[O, I]`` float32 of a ggml-typed weight given its ``fields``.

    Bit for bit ``gguf.quants.dequantize(pack(name, fields), qtype)``: the same float32
    products and differences in the same order (see the module table). The result is on
    the device of ``fields['q']``.
    """
    b = block(name)
    f = check_fields(name, fields)
    q = f["q"]
    n_rows, n_cols = q.shape
    nb, ns = n_cols // b.super, b.super // b.sub

    def sup(t: torch.Tensor) -> torch.Tensor:  # [O, I/super] -> [O, nb, 1, 1]
        return t.reshape(n_rows, nb, 1, 1).to(torch.float32)

    def sub(t: torch.Tensor, offset: int = 0) -> torch.Tensor:  # [O, I/sub] -> [O, nb, ns, 1]
        return (t.reshape(n_rows, nb, ns, 1).to(torch.int32) - offset).to(torch.float32)

    qi = q.reshape(n_rows, nb, ns, b.sub).to(torch.int32)
    n = b.name
    if n == "Q8_0":
        x = qi.to(torch.float32) * sup(f["d"])
    elif n in ("Q4_0", "Q5_0"):
        x = sup(f["d"]) * (qi - (8 if n == "Q4_0" else 16)).to(torch.float32)
    elif n in ("Q4_1", "Q5_1"):
        x = sup(f["d"]) * qi.to(torch.float32) + sup(f["m"])
    elif n in ("Q2_K", "Q4_K", "Q5_K"):
        x = (sup(f["d"]) * sub(f["sc"])) * qi.to(torch.float32) - (sup(f["dmin"]) * sub(f["mn"]))
    elif n == "Q3_K":
        x = (sup(f["d"]) * sub(f["sc"], 32)) * (qi - 4).to(torch.float32)
    elif n == "Q6_K":
        x = (sup(f["d"]) * sub(f["sc"])) * (qi - 32).to(torch.float32)
    elif n == "IQ4_NL":
        x = sup(f["d"]) * _KV_IQ4.to(q.device)[qi.long()]
    elif n == "IQ4_XS":
        x = (sup(f["d"]) * sub(f["sc"], 32)) * _KV_IQ4.to(q.device)[qi.long()]
    elif n == "NVFP4":
        scale = _UE4M3.to(q.device)[f["sc"].long()].reshape(n_rows, nb, ns, 1)
        x = scale * _KV_NVFP4.to(q.device)[qi.long()]
    else:  # pragma: no cover - every registered type has a branch
        raise FormatError(f"ggml type {n}: no dequantizer")
    return x.reshape(n_rows, n_cols)


def pack(name: str, fields: dict) -> np.ndarray:
    """ggml's bytes of a weight: uint8 ``[O, I/super*type_size]``; see ggml_pack.pack."""
    from lowbit.formats.ggml_pack import pack as _pack

    return _pack(name, fields)


def unpack(name: str, raw, n_cols: int) -> dict[str, torch.Tensor]:
    """Fields of ggml bytes ``raw`` uint8 ``[O, nbytes]`` for rows of ``n_cols`` columns."""
    from lowbit.formats.ggml_pack import unpack as _unpack

    return _unpack(name, raw, n_cols)
