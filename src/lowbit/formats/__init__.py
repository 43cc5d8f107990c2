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

The names below are imported on first use (PEP 562): the formats use torch, and
``lowbit.formats.facts`` (the static table ``lowbit formats`` prints) must be importable
without it. Use the formats through this package (``formats.get``, ``from lowbit.formats
import get``), so the registry is filled in its fixed order: integers first, then floats.
"""

from __future__ import annotations

_NAMES = {
    "Format": "base", "check_finite": "base", "get": "base", "names": "base",
    "register": "base", "IntFormat": "integer", "FloatFormat": "floats", "pack": "packing",
    "packed_size": "packing", "unpack": "packing",
}

__all__ = [
    "Format", "FloatFormat", "IntFormat", "check_finite", "get", "names", "register",
    "pack", "packed_size", "unpack",
]


def _load() -> None:
    """Import the format modules (integers register first, then floats) into this package."""
    from lowbit.formats import base, integer, floats, packing  # noqa: I001  (order matters)

    mods = {"base": base, "integer": integer, "floats": floats, "packing": packing}
    g = globals()
    for name, mod in _NAMES.items():
        g[name] = getattr(mods[mod], name)


def __getattr__(name: str):
    if name in _NAMES:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'lowbit.formats' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
