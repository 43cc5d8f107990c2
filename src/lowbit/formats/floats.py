"""Minifloat formats ExMy: FP8 (e4m3fn, e5m2), FP6 (e3m2, e2m3), FP4 (e2m1) and E8M0.

A code is ``sign | exponent (E bits) | mantissa (M bits)`` from the most significant bit
down, in the low ``bits`` bits of a uint8. With bias ``b``, a normal code (exponent field
``e >= 1``) means ``(-1)^s * 2^(e-b) * (1 + m/2^M)``; a subnormal (``e == 0``) means
``(-1)^s * 2^(1-b) * (m/2^M)``.

Special values follow each format's own definition:

* ``fp8_e4m3`` (OCP/NVIDIA e4m3fn): no Inf; only ``S.1111.111`` is NaN; max 448.
* ``fp8_e5m2`` (IEEE-like): exponent all ones is Inf (mantissa 0) or NaN; max 57344.
* ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1`` (OCP MX elements): no Inf, no NaN; max 28, 7.5, 6.
* ``e8m0`` (OCP MX shared scale): unsigned, no mantissa, no zero, no subnormals;
  value ``2^(e-127)`` for e in 0..254, ``0xFF`` is NaN. Values below ``2^-127`` (zero
  included) become ``2^-127``; a tie between two powers of two rounds up (as ml_dtypes).

Rounding is to nearest, ties to even (on the code's bit pattern). Quantizers want
saturation, so every value beyond ``max`` (Inf included) becomes ``+-max``: lowbit never
produces Inf from a finite-or-infinite input. NaN becomes the NaN code where the format has
one and is an error (``FormatError``) where it has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.errors import FormatError
from lowbit.formats.base import Format, register


@dataclass(frozen=True)
class FloatFormat(Format):
    """A minifloat with ``ebits`` exponent and ``mbits`` mantissa bits and exponent ``bias``.

    ``nan`` is one of ``"none"`` (no NaN code), ``"ieee"`` (exponent all ones with a non-zero
    mantissa, and Inf with mantissa zero) or ``"fn"`` (only the all-ones pattern is NaN).
    """

    ebits: int = 4
    mbits: int = 3
    bias: int = 7
    has_sign: bool = True
    nan: str = "none"
    subnormals: bool = True
    torch_dtype: str | None = None  # name of the native torch dtype, when there is one

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", "float")
        if self.bits != self.ebits + self.mbits + (1 if self.has_sign else 0):
            raise FormatError(f"format {self.name!r}: bits != sign + ebits + mbits")

    # --- range -------------------------------------------------------------------------
    @property
    def _top_exp_field(self) -> int:
        all_ones = 2**self.ebits - 1
        if self.nan == "ieee" or (self.nan == "fn" and self.mbits == 0):
            return all_ones - 1
        return all_ones

    @property
    def _top_mantissa(self) -> int:
        all_ones = 2**self.mbits - 1
        if self.nan == "fn" and self.mbits > 0:
            return all_ones - 1
        return all_ones

    @property
    def emin(self) -> int:
        """Exponent (unbiased) of the smallest normal value."""
        return (1 if self.subnormals else 0) - self.bias

    @property
    def emax(self) -> int:
        """Exponent (unbiased) of the largest finite value."""
        return self._top_exp_field - self.bias

    @property
    def max(self) -> float:
        return 2.0**self.emax * (1 + self._top_mantissa / 2**self.mbits)

    @property
    def min(self) -> float:
        return -self.max if self.has_sign else self.min_subnormal

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        if not self.subnormals:
            return self.min_normal
        return 2.0 ** (self.emin - self.mbits)

    @property
    def has_inf(self) -> bool:
        """Whether the format has Inf codes (lowbit never produces them when quantizing)."""
        return self.nan == "ieee"

    @property
    def has_nan(self) -> bool:
        """Whether the format has NaN codes."""
        return self.nan != "none"

    @property
    def nan_code(self) -> int:
        """The code lowbit writes for NaN (positive sign); FormatError if there is none."""
        if self.nan == "none":
            raise FormatError(f"format {self.name} has no NaN code")
        if self.nan == "fn":
            return 2 ** (self.ebits + self.mbits) - 1
        return ((2**self.ebits - 1) << self.mbits) | (2 ** (self.mbits - 1) if self.mbits else 1)

    # --- tables ------------------------------------------------------------------------
    def _code_value(self, code: int) -> float:
        sign_bit = (code >> (self.ebits + self.mbits)) & 1 if self.has_sign else 0
        e = (code >> self.mbits) & (2**self.ebits - 1)
        m = code & (2**self.mbits - 1)
        sign = -1.0 if sign_bit else 1.0
        all_ones = 2**self.ebits - 1
        if self.nan == "ieee" and e == all_ones:
            return sign * float("inf") if m == 0 else float("nan")
        if self.nan == "fn" and e == all_ones and m == 2**self.mbits - 1:
            return float("nan")
        if e == 0 and self.subnormals:
            return sign * 2.0 ** (1 - self.bias) * (m / 2**self.mbits)
        return sign * 2.0 ** (e - self.bias) * (1 + m / 2**self.mbits)

    def table(self) -> torch.Tensor:
        """float32 value of every code 0..2^bits-1 (NaN/Inf where the format says)."""
        return _table(self)

    # --- rounding ------------------------------------------------------------------------
    def round(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.torch_dtype is not None:
            dt = getattr(torch, self.torch_dtype)
            return xf.clamp(-self.max, self.max).to(dt).to(torch.float32)
        a = xf.abs()
        _, e = torch.frexp(a)
        exp = (e - 1).clamp_(min=self.emin)
        q = torch.ldexp(torch.ones_like(a), exp - self.mbits)
        r = a / q
        # ties to even significand; with no mantissa bits (e8m0) 1.5 -> 2: ties round up,
        # as ml_dtypes' float8_e8m0fnu does
        n = torch.round(r)
        y = (n * q).clamp_(max=self.max)
        if not self.subnormals:
            y = y.clamp_(min=self.min_normal)
        if self.has_sign:
            y = torch.copysign(y, xf)
        else:
            y = torch.where(xf < 0, torch.full_like(y, float("nan")), y)
        return y

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.torch_dtype is not None:
            dt = getattr(torch, self.torch_dtype)
            return xf.clamp(-self.max, self.max).to(dt).view(torch.uint8)
        y = self.round(xf)
        nan = torch.isnan(y)
        if not self.has_nan and bool(nan.any()):
            raise FormatError(f"format {self.name} has no NaN: the input holds NaN values")
        pos_vals, pos_codes = (t.to(y.device) for t in _positive_grid(self))
        mag = torch.where(nan, torch.zeros_like(y), y.abs())
        idx = torch.searchsorted(pos_vals, mag.reshape(-1)).reshape(mag.shape)
        idx = idx.clamp_(max=pos_vals.numel() - 1)
        codes = pos_codes[idx]
        if self.has_sign:
            codes = codes | (torch.signbit(y).to(torch.int32) << (self.bits - 1))
        if self.has_nan:
            codes = torch.where(nan, torch.full_like(codes, self.nan_code), codes)
        return codes.to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table().to(codes.device)[codes.to(torch.int64) & (2**self.bits - 1)]

    # --- text ---------------------------------------------------------------------------
    def layout(self) -> str:
        return f"{1 if self.has_sign else 0}.{self.ebits}.{self.mbits}"

    def describe(self) -> str:
        specials = {
            "none": "no Inf and no NaN",
            "ieee": "Inf (exponent all ones, mantissa 0) and NaN (exponent all ones, mantissa != 0)",
            "fn": "no Inf; only the all-ones pattern is NaN",
        }[self.nan]
        sub = "with subnormals" if self.subnormals else "no subnormals, no zero"
        return (
            f"{self.name}: {self.bits}-bit float, sign.exp.mant {self.layout()}, bias {self.bias}, "
            f"{sub}; {specials}; max {self.max:g}, min normal {self.min_normal:g}, "
            f"min subnormal {self.min_subnormal:g}; round to nearest even, values beyond "
            f"+-{self.max:g} (and Inf) saturate to +-{self.max:g}."
        )


@lru_cache(maxsize=None)
def _table(fmt: FloatFormat) -> torch.Tensor:
    return torch.tensor([fmt._code_value(c) for c in range(2**fmt.bits)], dtype=torch.float32)


@lru_cache(maxsize=None)
def _positive_grid(fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted non-negative finite values and their (sign-0) codes."""
    half = 2 ** (fmt.bits - 1) if fmt.has_sign else 2**fmt.bits
    t = _table(fmt)[:half]
    codes = torch.arange(half, dtype=torch.int32)
    keep = torch.isfinite(t)
    vals, order = torch.sort(t[keep])
    return vals.contiguous(), codes[keep][order].contiguous()


FP8_E4M3 = register(FloatFormat(name="fp8_e4m3", bits=8, ebits=4, mbits=3, bias=7, nan="fn",
                                torch_dtype="float8_e4m3fn"))
FP8_E5M2 = register(FloatFormat(name="fp8_e5m2", bits=8, ebits=5, mbits=2, bias=15, nan="ieee",
                                torch_dtype="float8_e5m2"))
FP6_E3M2 = register(FloatFormat(name="fp6_e3m2", bits=6, ebits=3, mbits=2, bias=3))
FP6_E2M3 = register(FloatFormat(name="fp6_e2m3", bits=6, ebits=2, mbits=3, bias=1))
FP4_E2M1 = register(FloatFormat(name="fp4_e2m1", bits=4, ebits=2, mbits=1, bias=1))
E8M0 = register(FloatFormat(name="e8m0", bits=8, ebits=8, mbits=0, bias=127, has_sign=False,
                            nan="fn", subnormals=False))
E4M3 = register(FloatFormat(name="e4m3", bits=8, ebits=4, mbits=3, bias=7, nan="fn",
                            torch_dtype="float8_e4m3fn"))
