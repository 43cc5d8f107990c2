"""The facts ``lowbit formats`` prints, as plain data (importable without torch).

The formats themselves (:mod:`lowbit.formats.integer`, :mod:`lowbit.formats.floats`) compute
with torch, and importing torch takes seconds; the command that only prints their table must
not pay for it. This module is a snapshot of the registries: every element and scale format of
:func:`lowbit.formats.names` (its ``as_dict()`` plus ``kind``, ``bias`` and ``nan``) and every
block format of :func:`lowbit.core.blocks.block_format_names`, in registration order.
``tests/formats/test_facts.py`` checks that it equals what the registries compute, and prints
the rows to paste here when a format is added or changed.

Units: ``bits`` per code; ``max``, ``min_normal``, ``min_subnormal`` are real values (for
integers, code values); ``values`` counts distinct finite values (+0 and -0 once);
``bits_per_value`` of a block format is the element's bits plus the scale's bits over the block
(the per-tensor fp32 scale of nvfp4 excluded).
"""

from __future__ import annotations

ELEMENT_FIELDS = ("name", "kind", "bits", "layout", "bias", "nan", "max", "min_normal",
                  "min_subnormal", "values")

_ELEMENTS = [
    ("int2", "int", 2, "int", None, None, 1.0, 1.0, 1.0, 4),
    ("int3", "int", 3, "int", None, None, 3.0, 1.0, 1.0, 8),
    ("int4", "int", 4, "int", None, None, 7.0, 1.0, 1.0, 16),
    ("int5", "int", 5, "int", None, None, 15.0, 1.0, 1.0, 32),
    ("int6", "int", 6, "int", None, None, 31.0, 1.0, 1.0, 64),
    ("int7", "int", 7, "int", None, None, 63.0, 1.0, 1.0, 128),
    ("int8", "int", 8, "int", None, None, 127.0, 1.0, 1.0, 256),
    ("uint2", "int", 2, "uint", None, None, 3.0, 1.0, 1.0, 4),
    ("uint3", "int", 3, "uint", None, None, 7.0, 1.0, 1.0, 8),
    ("uint4", "int", 4, "uint", None, None, 15.0, 1.0, 1.0, 16),
    ("uint5", "int", 5, "uint", None, None, 31.0, 1.0, 1.0, 32),
    ("uint6", "int", 6, "uint", None, None, 63.0, 1.0, 1.0, 64),
    ("uint7", "int", 7, "uint", None, None, 127.0, 1.0, 1.0, 128),
    ("uint8", "int", 8, "uint", None, None, 255.0, 1.0, 1.0, 256),
    ("fp8_e4m3", "float", 8, "1.4.3", 7, "fn", 448.0, 2.0**-6, 2.0**-9, 253),
    ("fp8_e5m2", "float", 8, "1.5.2", 15, "ieee", 57344.0, 2.0**-14, 2.0**-16, 247),
    ("fp6_e3m2", "float", 6, "1.3.2", 3, "none", 28.0, 0.25, 0.0625, 63),
    ("fp6_e2m3", "float", 6, "1.2.3", 1, "none", 7.5, 1.0, 0.125, 63),
    ("fp4_e2m1", "float", 4, "1.2.1", 1, "none", 6.0, 1.0, 0.5, 15),
    ("e8m0", "float", 8, "0.8.0", 127, "fn", 2.0**127, 2.0**-127, 2.0**-127, 255),
    ("e4m3", "float", 8, "1.4.3", 7, "fn", 448.0, 2.0**-6, 2.0**-9, 253),
]

BLOCK_FIELDS = ("name", "element", "block_size", "scale_format", "global_scale",
                "bits_per_value")

_BLOCKS = [
    ("nvfp4", "fp4_e2m1", 16, "e4m3", True, 4.5),
    ("mxfp4", "fp4_e2m1", 32, "e8m0", False, 4.25),
    ("mxfp6_e3m2", "fp6_e3m2", 32, "e8m0", False, 6.25),
    ("mxfp6_e2m3", "fp6_e2m3", 32, "e8m0", False, 6.25),
    ("mxfp8_e4m3", "fp8_e4m3", 32, "e8m0", False, 8.25),
    ("mxfp8_e5m2", "fp8_e5m2", 32, "e8m0", False, 8.25),
]


def element_formats() -> list[dict]:
    """One dict per element/scale format (keys :data:`ELEMENT_FIELDS`), registry order."""
    return [dict(zip(ELEMENT_FIELDS, r)) for r in _ELEMENTS]


def block_formats() -> list[dict]:
    """One dict per block-scaled format (keys :data:`BLOCK_FIELDS`), registry order."""
    return [dict(zip(BLOCK_FIELDS, r)) for r in _BLOCKS]
