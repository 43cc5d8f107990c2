"""Integer formats ``int2``..``int8`` and ``uint2``..``uint8``.

Signed codes are two's complement in the low ``bits`` bits of a uint8 (``int4`` -1 is
``0b1111`` = 15). The full range is ``[-2^(b-1), 2^(b-1)-1]``; the *narrow* (symmetric)
variant drops the most negative value so the grid is symmetric: ``[-(2^(b-1)-1), 2^(b-1)-1]``.
Rounding is to nearest, ties to even (``torch.round``); out-of-range values saturate to the
nearest end of the range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, register


@dataclass(frozen=True)
class IntFormat(Format):
    """A ``bits``-wide integer format, signed (two's complement) or unsigned."""

    is_signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", "int")

    @property
    def qmin(self) -> int:
        """Smallest code value as an integer."""
        if not self.is_signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        """Largest code value as an integer."""
        return 2**self.bits - 1 if not self.is_signed else 2 ** (self.bits - 1) - 1

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def min(self) -> float:
        return float(self.qmin)

    @property
    def min_normal(self) -> float:
        return 1.0

    @property
    def min_subnormal(self) -> float:
        return 1.0

    def narrowed(self) -> "IntFormat":
        """The symmetric-range variant of this signed format (drops ``-2^(b-1)``)."""
        return IntFormat(name=f"{self.name}_narrow", bits=self.bits, is_signed=self.is_signed,
                         narrow=True)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        # + 0.0 turns -0.0 into +0.0: integers have no negative zero, so the float path
        # gives exactly what decode(encode(x)) gives
        return torch.round(x.float()).clamp_(self.qmin, self.qmax).add_(0.0)

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """Rounded integer values (int32) of ``x``: the codes' meaning before bit encoding."""
        return self.round(x).to(torch.int32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_int(x)
        return (q & (2**self.bits - 1)).to(torch.uint8)

    def code_to_int(self, codes: torch.Tensor) -> torch.Tensor:
        """Sign-extend uint8 codes to int32 integer values."""
        c = codes.to(torch.int32) & (2**self.bits - 1)
        if self.is_signed:
            c = torch.where(c >= 2 ** (self.bits - 1), c - 2**self.bits, c)
        return c

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.code_to_int(codes).to(torch.float32)

    def values(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    def layout(self) -> str:
        return "int" if self.is_signed else "uint"

    def describe(self) -> str:
        kind = "two's-complement signed" if self.is_signed else "unsigned"
        rng = "narrow symmetric" if self.narrow else "full"
        return (
            f"{self.name}: {self.bits}-bit {kind} integer, {rng} range [{self.qmin}, {self.qmax}]; "
            "round to nearest, ties to even; out-of-range values saturate to the range ends."
        )


for _b in range(2, 9):
    register(IntFormat(name=f"int{_b}", bits=_b, is_signed=True))
for _b in range(2, 9):
    register(IntFormat(name=f"uint{_b}", bits=_b, is_signed=False))
