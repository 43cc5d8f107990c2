"""What lowbit needs to know of each ggml block type to search and round it.

Every ggml type of :mod:`lowbit.formats.ggml_blocks` is written here in one common form: an
element is ``x_hat = s * c - zp`` where

* ``c`` is the *code value* of the element: an integer ``cmin..cmax`` (the stored code
  minus ``q_off``) or an entry of a code book (``lut``: IQ4's ``kvalues``, NVFP4's doubled
  e2m1 values);
* ``s`` is the effective sub-block scale, a float32 computed as ggml computes it:
  ``d`` itself (float16, one per sub-block for Q8_0/Q4_0/.../IQ4_NL), ``d * isc``
  (``level="int"``: a float16 super scale times an integer sub-scale ``isc = sc - sc_off``)
  or ``ue4m3(sc) / 2`` (NVFP4);
* ``zp`` is the effective offset: ``dmin * mn`` (K-quants with a min), ``-m`` (Q4_1/Q5_1),
  or none.

The float operations are those of ``gguf.quants`` (``(d*sc)*q - (dmin*mn)``, ...), so these
values equal :func:`lowbit.formats.ggml_blocks.dequantize` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import ggml_blocks as gb


@dataclass(frozen=True)
class GgmlType:
    """Search facts of one ggml type (see the module doc for ``c``, ``s``, ``zp``).

    ``level``: ``fp16`` (one float16 scale per sub-block, sub == super), ``int`` (float16
    ``d`` per super-block times integer ``isc`` in ``isc_lo..isc_hi``; stored ``sc = isc +
    sc_off``) or ``ue4m3``. ``affine``: has an offset; ``mn_hi``: range of the integer min
    of K-quants (``0..mn_hi``, offset ``dmin * mn >= 0``). ``min_le0``: ggml keeps the
    block minimum at or below 0 (K-quants). ``free``: llama.cpp's weighting without an
    imatrix (``one``, ``abs`` = ``|x|``, ``sq`` = ``x^2``, ``avabs`` = ``rms*sqrt2 + |x|``).
    """

    name: str
    cmin: int
    cmax: int
    lut: tuple[int, ...] | None
    q_off: int
    level: str
    affine: bool = False
    isc_lo: int = 0
    isc_hi: int = 0
    sc_off: int = 0
    mn_hi: int = 0
    min_le0: bool = False
    free: str = "one"
    code_bits: int = 4

    @property
    def block(self) -> gb.GgmlBlock:
        """The :class:`~lowbit.formats.ggml_blocks.GgmlBlock` (sizes, fields)."""
        return gb.GGML_BLOCKS[self.name]

    @property
    def sub(self) -> int:
        """Columns per sub-block scale."""
        return self.block.sub

    @property
    def sup(self) -> int:
        """Columns per ggml block (super-block)."""
        return self.block.super

    @property
    def global_kind(self) -> str | None:
        """Stored ``global_scale``: ``"d"`` ([O, I/super]), ``"d_dmin"`` ([O, I/super, 2])."""
        if self.level != "int":
            return None
        return "d_dmin" if self.affine else "d"


_IQ = tuple(gb.KVALUES_IQ4NL)
_NV = tuple(gb.KVALUES_NVFP4)

GGML_TYPES: dict[str, GgmlType] = {t.name: t for t in (
    GgmlType("Q8_0", -128, 127, None, 0, "fp16", code_bits=8),
    GgmlType("Q4_0", -8, 7, None, 8, "fp16"),
    GgmlType("Q5_0", -16, 15, None, 16, "fp16", code_bits=5),
    GgmlType("Q4_1", 0, 15, None, 0, "fp16", affine=True),
    GgmlType("Q5_1", 0, 31, None, 0, "fp16", affine=True, code_bits=5),
    GgmlType("Q2_K", 0, 3, None, 0, "int", True, 0, 15, 0, 15, True, "abs", 2),
    GgmlType("Q3_K", -4, 3, None, 4, "int", False, -32, 31, 32, free="sq", code_bits=3),
    GgmlType("Q4_K", 0, 15, None, 0, "int", True, 0, 63, 0, 63, True, "avabs", 4),
    GgmlType("Q5_K", 0, 31, None, 0, "int", True, 0, 63, 0, 63, True, "avabs", 5),
    GgmlType("Q6_K", -32, 31, None, 32, "int", False, -128, 127, 0, free="sq", code_bits=6),
    GgmlType("IQ4_NL", min(_IQ), max(_IQ), _IQ, 0, "fp16", free="sq"),
    GgmlType("IQ4_XS", min(_IQ), max(_IQ), _IQ, 0, "int", False, -32, 31, 32, free="sq"),
    GgmlType("NVFP4", min(_NV), max(_NV), _NV, 0, "ue4m3"),
)}


class _Lut:
    """Sorted distinct code-book values and, per half-unit interval ``[k/2, (k+1)/2)`` of
    ``y``, the nearest one (the code books' midpoints are multiples of 1/2, so one table
    lookup finds the nearest value; at an exact midpoint the upper value)."""

    def __init__(self, lut: tuple[int, ...]):
        vals = sorted(set(lut))
        mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
        assert all(2 * m == int(2 * m) for m in mids)
        self.lo, self.hi = 2 * vals[0], 2 * vals[-1]
        centers = torch.arange(self.lo, self.hi + 1, dtype=torch.float64) / 2 + 0.25
        idx = torch.bucketize(centers, torch.tensor(mids, dtype=torch.float64))
        self.values = torch.tensor(vals, dtype=torch.float32)
        self.codes = torch.tensor([lut.index(v) for v in vals], dtype=torch.uint8)
        self.table_values = self.values[idx].contiguous()
        self.table_codes = self.codes[idx].contiguous()

    def index(self, y: torch.Tensor) -> torch.Tensor:
        """int64 table positions of ``y`` (any float tensor; NaN is not expected)."""
        return torch.floor(y * 2).clamp_(self.lo, self.hi).sub_(self.lo).long()


_LUTS = {n: _Lut(t.lut) for n, t in GGML_TYPES.items() if t.lut is not None}


def _ue4m3_values() -> torch.Tensor:
    """float32 [127]: NVFP4's scale of each byte 0..0x7E (ue4m3 / 2), from ggml_blocks."""
    n = gb.NVFP4_SCALE_MAX + 1
    m = n + (-n) % 4  # 4 sub-blocks per 64-column block
    sc = torch.cat([torch.arange(n), torch.zeros(m - n, dtype=torch.long)]).to(torch.uint8)
    q = torch.full((1, 16 * m), gb.KVALUES_NVFP4.index(1), dtype=torch.uint8)
    x = gb.dequantize("NVFP4", {"q": q, "sc": sc.reshape(1, m)})
    return x.reshape(-1, 16)[:n, 0].contiguous()


_UE4M3_VALUES = _ue4m3_values()
_UE4M3_MIDS = (_UE4M3_VALUES[1:] + _UE4M3_VALUES[:-1]) / 2


def ue4m3_round(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest NVFP4 sub-block scale to ``|s|``: ``(value float32, byte uint8)``, same shape."""
    i = torch.bucketize(s.abs(), _UE4M3_MIDS.to(s.device))
    return _UE4M3_VALUES.to(s.device)[i], i.to(torch.uint8)


def ue4m3_value(byte: torch.Tensor) -> torch.Tensor:
    """NVFP4 scale (float32) of scale bytes ``byte`` (0..0x7E)."""
    return _UE4M3_VALUES.to(byte.device)[byte.long()]


def ue4m3_byte(s: torch.Tensor) -> torch.Tensor | None:
    """Byte of each NVFP4 scale value ``s``, or None when some value is not exactly one."""
    v, b = ue4m3_round(s)
    return b if torch.equal(v, s) else None


def nearest(t: GgmlType, y: torch.Tensor, want_code: bool = False):
    """Nearest code value ``c`` (float32) to ``y`` = x / s (round half to even for integer
    types; the upper value at an exact midpoint of a code book). ``want_code``: also the
    stored ggml code ``q`` (uint8, or int8 for Q8_0). Same shape as ``y``."""
    if t.lut is None:
        c = torch.round(y).clamp_(t.cmin, t.cmax).add_(0.0)  # + 0.0: no -0 (as ggml's ints)
        if not want_code:
            return c
        q = (c + t.q_off).to(torch.int8 if t.cmin < -t.q_off or t.name == "Q8_0" else torch.uint8)
        return c, q
    lut = _LUTS[t.name]
    i = lut.index(y)
    c = torch.take(lut.table_values.to(y.device), i)
    return (c, torch.take(lut.table_codes.to(y.device), i)) if want_code else c


def nearest_(t: GgmlType, y: torch.Tensor, want_code: bool = False):
    """:func:`nearest` that may overwrite ``y`` (a temporary the caller owns)."""
    if t.lut is None and not want_code:
        return y.round_().clamp_(t.cmin, t.cmax).add_(0.0)
    return nearest(t, y, want_code)


def code_values(t: GgmlType, q: torch.Tensor) -> torch.Tensor:
    """Code values ``c`` (float32) of stored ggml codes ``q``."""
    if t.lut is None:
        return (q.to(torch.int32) - t.q_off).to(torch.float32)
    return torch.tensor(t.lut, dtype=torch.float32, device=q.device)[q.long()]


def fp16(v: torch.Tensor) -> torch.Tensor:
    """``v`` rounded to float16 (saturating at +-65504), as float32."""
    return v.clamp(-65504.0, 65504.0).half().float()
