"""Number formats as data: what an n-bit code means.

>>> from lowbit import formats
>>> formats.get("fp8_e4m3").max
448.0
>>> formats.names()[:3]
['int2', 'int3', 'int4']

Element formats: ``int2``..``int8``, ``uint2``..``uint8`` (narrow symmetric variants via
``IntFormat.narrowed()``), ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``,
``fp4_e2m1``; scale formats ``e8m0`` and ``e4m3``. Block-scaled formats (NVFP4, MX) are
compositions of these and live in :mod:`lowbit.core.blocks`.
"""

from lowbit.formats.base import Format, check_finite, get, names, register
from lowbit.formats.integer import IntFormat  # noqa: I001  (integers register first)
from lowbit.formats.floats import FloatFormat
from lowbit.formats.packing import pack, packed_size, unpack

__all__ = [
    "Format", "FloatFormat", "IntFormat", "check_finite", "get", "names", "register",
    "pack", "packed_size", "unpack",
]
