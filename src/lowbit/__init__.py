"""lowbit: quantize PyTorch models on any machine.

>>> import lowbit
>>> model = lowbit.quantize(model, "int4-weight-only", group_size=64)   # doctest: +SKIP
>>> lowbit.print_summary(model)                                        # doctest: +SKIP

Layers: :mod:`lowbit.formats` (what a code means), :mod:`lowbit.core` (quantize/dequantize),
:mod:`lowbit.calib`, :mod:`lowbit.nn`, :mod:`lowbit.recipes`, :mod:`lowbit.pipeline`.
"""

from lowbit.core import QTensor, QuantSpec, dequantize, fake_quant, quantize as quantize_tensor
from lowbit.nn import disable_quantizers, enable_quantizers, print_summary
from lowbit.pipeline import calibrate, quantize
from lowbit.export import load, save

__version__ = "0.1.0"

__all__ = [
    "QTensor", "QuantSpec", "calibrate", "dequantize", "disable_quantizers",
    "enable_quantizers", "fake_quant", "load", "print_summary", "quantize", "quantize_tensor",
    "save",
    "__version__",
]
