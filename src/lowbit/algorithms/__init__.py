"""Quantization algorithms as pure functions over a layer or a block's linears:
GPTQ, AWQ, SmoothQuant (and the scale folding they share)."""

from lowbit.algorithms.awq_sq import awq_clip, awq_group, group_error, smoothquant_group
from lowbit.algorithms.gptq import GPTQResult, HessianAccumulator, gptq_quantize_weight
from lowbit.algorithms.smoothing import fold_scales

__all__ = ["GPTQResult", "HessianAccumulator", "awq_clip", "awq_group", "fold_scales",
           "gptq_quantize_weight", "group_error", "smoothquant_group"]
