"""Block-scaled formats: NVFP4 and the OCP MX v1.0 family.

A block format is an element format, a block size along the last axis and a scale format:

* ``nvfp4``: e2m1 elements, one e4m3 scale per 16 values, and one float32 per-tensor
  ("global") scale: ``x ~ e2m1 * e4m3_scale * global_scale`` with
  ``global_scale = amax(tensor) / (6 * 448)`` so the block scales use e4m3's whole range.
* ``mxfp4``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp8_e4m3``, ``mxfp8_e5m2``: one e8m0 shared
  exponent per 32 values: ``X = floor(log2(amax(block))) - emax(element)``, scale ``2^X``
  (clamped to e8m0's range ``[-127, 127]``), elements rounded to nearest even with
  saturation (OCP MX v1.0, section 6.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import ConfigError


@dataclass(frozen=True)
class BlockFormat:
    """Element format + block size + scale format (+ an optional per-tensor scale)."""

    name: str
    element: str
    block_size: int
    scale_format: str
    global_scale: bool

    @property
    def bits_per_value(self) -> float:
        """Average storage bits per value, scales included (the per-tensor scale excluded)."""
        from lowbit.formats import get

        return get(self.element).bits + get(self.scale_format).bits / self.block_size


_BLOCK_FORMATS: dict[str, BlockFormat] = {}


def register_block_format(bf: BlockFormat) -> BlockFormat:
    """Add a block-scaled format to the registry under ``bf.name``."""
    if bf.name in _BLOCK_FORMATS:
        raise ConfigError(f"block format {bf.name!r} is registered twice")
    _BLOCK_FORMATS[bf.name] = bf
    return bf


def get_block_format(name: str) -> BlockFormat | None:
    """The block format called ``name``, or None when ``name`` is not one."""
    return _BLOCK_FORMATS.get(name)


def block_format_names() -> list[str]:
    """Names of the registered block-scaled formats."""
    return list(_BLOCK_FORMATS)


register_block_format(BlockFormat("nvfp4", "fp4_e2m1", 16, "e4m3", True))
register_block_format(BlockFormat("mxfp4", "fp4_e2m1", 32, "e8m0", False))
register_block_format(BlockFormat("mxfp6_e3m2", "fp6_e3m2", 32, "e8m0", False))
register_block_format(BlockFormat("mxfp6_e2m3", "fp6_e2m3", 32, "e8m0", False))
register_block_format(BlockFormat("mxfp8_e4m3", "fp8_e4m3", 32, "e8m0", False))
register_block_format(BlockFormat("mxfp8_e5m2", "fp8_e5m2", 32, "e8m0", False))
