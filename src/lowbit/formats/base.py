"""The abstract number format and the registry of formats.

A *format* says what an n-bit code means. It never knows about tensors' roles or modules:
it maps real numbers (already divided by their scale) to codes and back.

Conventions shared by every format:

* ``encode(x)`` takes a float tensor of any shape (computed in float32) and returns a
  ``torch.uint8`` tensor of the same shape whose low ``bits`` bits hold the code.
* ``decode(codes)`` takes such a uint8 tensor and returns float32 values.
* ``round(x)`` returns the float32 value that ``decode(encode(x))`` would give, computed
  directly (the fast path of fake quantization). The two agree bit for bit.
* Rounding is to nearest, ties to even; values beyond the largest finite magnitude
  saturate to it (see each format's ``describe()``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from lowbit.errors import FormatError


@dataclass(frozen=True)
class Format(ABC):
    """A number format: ``bits`` wide, with a largest finite value ``max``."""

    name: str
    bits: int
    kind: str = field(default="", init=False)

    # --- properties every format has -------------------------------------------------
    @property
    @abstractmethod
    def max(self) -> float:
        """Largest finite representable value (a positive number)."""

    @property
    @abstractmethod
    def min(self) -> float:
        """Smallest (most negative) representable finite value."""

    @property
    @abstractmethod
    def min_normal(self) -> float:
        """Smallest positive normal value (for integers: 1)."""

    @property
    @abstractmethod
    def min_subnormal(self) -> float:
        """Smallest positive value (for integers: 1; floats without subnormals: min_normal)."""

    @property
    def signed(self) -> bool:
        """Whether negative values are representable."""
        return self.min < 0

    # --- codes -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` (any float dtype, any shape) to this format; return uint8 codes."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Map uint8 codes (any shape) to float32 values."""

    @abstractmethod
    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` to the nearest representable value; float32 out, same shape."""

    def values(self) -> torch.Tensor:
        """All distinct finite representable values, sorted ascending (float32)."""
        codes = torch.arange(2**self.bits, dtype=torch.int32).to(torch.uint8)
        v = self.decode(codes)
        v = v[torch.isfinite(v)]
        return torch.unique(v)  # unique merges +0/-0

    @property
    def num_values(self) -> int:
        """Number of distinct finite values (+0 and -0 count once)."""
        return int(self.values().numel())

    @abstractmethod
    def layout(self) -> str:
        """Short bit layout, e.g. ``'1.4.3'`` (sign.exponent.mantissa) or ``'int'``."""

    @abstractmethod
    def describe(self) -> str:
        """One paragraph: layout, range, special values and the saturation rule."""

    def as_dict(self) -> dict:
        """The table row of this format (used by ``lowbit formats``)."""
        return {
            "name": self.name,
            "bits": self.bits,
            "layout": self.layout(),
            "max": self.max,
            "min_normal": self.min_normal,
            "min_subnormal": self.min_subnormal,
            "values": self.num_values,
        }


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add ``fmt`` to the registry under ``fmt.name``; a duplicate name is an error."""
    if fmt.name in _REGISTRY:
        raise FormatError(f"format {fmt.name!r} is registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str | Format) -> Format:
    """Return the format called ``name`` (a Format passes through unchanged)."""
    if isinstance(name, Format):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FormatError(
            f"unknown number format {name!r}; expected one of: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    """Names of all registered element and scale formats, in registration order."""
    return list(_REGISTRY)


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise FormatError when ``x`` holds NaN or Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n = int((~torch.isfinite(x)).sum())
        raise FormatError(f"{what} contains {n} NaN/Inf value(s); expected finite numbers")
