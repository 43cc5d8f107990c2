"""Tensor math of quantization: specs, granularity, scales, quantize/dequantize/fake_quant.

>>> import torch
>>> from lowbit.core import QuantSpec, quantize, dequantize, fake_quant
>>> spec = QuantSpec(format="int4", granularity="group", group_size=32)
>>> w = torch.randn(64, 128)
>>> qt = quantize(w, spec)          # codes [64, 128] uint8, scale [64, 4]
>>> torch.equal(dequantize(qt), fake_quant(w, spec))
True
"""

from lowbit.core.blocks import BlockFormat, block_format_names, get_block_format
from lowbit.core.ggml import (GGML_FORMATS, fields_effective, ggml_type, quantize_fields,
                              round_column, search_scales)
from lowbit.core.layout import Layout
from lowbit.core.quant import (QTensor, compute_scales, dequantize, fake_quant,
                               fake_quant_fixed, int_rows,
                               quantize, round_scale)
from lowbit.core.rotation import (ROTATION_KINDS, cayley, hadamard_matrix, is_hadamard_size,
                                  is_orthogonal, rotate_last, rotation_matrix)
from lowbit.core.spec import QuantSpec

__all__ = [
    "BlockFormat", "GGML_FORMATS", "Layout", "QTensor", "QuantSpec", "ROTATION_KINDS",
    "block_format_names", "cayley", "compute_scales", "dequantize", "fake_quant", "fake_quant_fixed",
    "fields_effective", "get_block_format", "ggml_type", "hadamard_matrix", "int_rows",
    "is_hadamard_size",
    "is_orthogonal", "quantize", "quantize_fields", "rotate_last", "rotation_matrix",
    "round_column", "round_scale", "search_scales",
]
