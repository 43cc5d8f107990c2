"""lowbit: quantize PyTorch models on any machine.

Number formats (:mod:`lowbit.formats`), quantization math (:mod:`lowbit.core`), and on top of
them calibration, algorithms and export.
"""

from lowbit.core import QTensor, QuantSpec, dequantize, fake_quant, quantize

__version__ = "0.1.0"

__all__ = ["QTensor", "QuantSpec", "dequantize", "fake_quant", "quantize", "__version__"]
