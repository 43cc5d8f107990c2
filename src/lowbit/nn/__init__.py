"""Quantized modules, the TensorQuantizer, KV-cache quantizers and recipe application."""

from lowbit.nn.fold import fold_batchnorm
from lowbit.nn.kv_cache import attach_kv_quantizers, find_attention_modules
from lowbit.nn.mha import QuantMultiheadAttention
from lowbit.nn.modules import (QuantConv1d, QuantConv2d, QuantLinear, QuantMixin,
                               quant_class_for, quantize_module)
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.nn.rotation import OnlineRotation, attach_rotation, online_rotations
from lowbit.nn.swap import ApplyReport, apply_recipe
from lowbit.nn.utils import (disable_quantizers, enable_quantizers, print_summary, quantizers,
                             summary_rows)

__all__ = [
    "ApplyReport", "OnlineRotation", "QuantConv1d", "QuantConv2d", "QuantLinear", "QuantMixin",
    "QuantMultiheadAttention", "attach_rotation", "fold_batchnorm", "online_rotations",
    "TensorQuantizer", "apply_recipe", "attach_kv_quantizers", "disable_quantizers",
    "enable_quantizers", "find_attention_modules", "print_summary", "quant_class_for",
    "quantize_module", "quantizers", "summary_rows",
]
