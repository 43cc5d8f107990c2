"""lowbit: quantize PyTorch models on any machine.

>>> import lowbit
>>> model = lowbit.quantize(model, "int4-weight-only", group_size=64)   # doctest: +SKIP
>>> lowbit.print_summary(model)                                        # doctest: +SKIP

Layers: lowbit.formats (what a code means), lowbit.core (quantize/dequantize), lowbit.calib,
lowbit.nn, lowbit.recipes, lowbit.pipeline, lowbit.export.

The public names below are resolved on first use (PEP 562), so ``import lowbit`` (and the
``lowbit`` command's ``--help``) does not import torch; ``lowbit.quantize`` or
``from lowbit import quantize`` imports what it needs.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> (module, attribute in that module)
_LAZY: dict[str, tuple[str, str]] = {
    "QTensor": ("lowbit.core", "QTensor"),
    "QuantSpec": ("lowbit.core", "QuantSpec"),
    "dequantize": ("lowbit.core", "dequantize"),
    "fake_quant": ("lowbit.core", "fake_quant"),
    "quantize_tensor": ("lowbit.core", "quantize"),
    "disable_quantizers": ("lowbit.nn", "disable_quantizers"),
    "enable_quantizers": ("lowbit.nn", "enable_quantizers"),
    "print_summary": ("lowbit.nn", "print_summary"),
    "calibrate": ("lowbit.pipeline", "calibrate"),
    "quantize": ("lowbit.pipeline", "quantize"),
    "load": ("lowbit.export", "load"),
    "save": ("lowbit.export", "save"),
}

__all__ = [
    "QTensor", "QuantSpec", "calibrate", "dequantize", "disable_quantizers",
    "enable_quantizers", "fake_quant", "load", "print_summary", "quantize", "quantize_tensor",
    "save",
    "__version__",
]


def __getattr__(name: str):
    """Import the module behind a public name on first access and cache the value."""
    if name not in _LAZY:
        # a subpackage (lowbit.recipes, lowbit.data...): as an eager ``import lowbit`` gave
        if not name.startswith("_") and importlib.util.find_spec(f"lowbit.{name}") is not None:
            return importlib.import_module(f"lowbit.{name}")
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    mod, attr = _LAZY[name]
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
