"""Quantization algorithms as pure functions over a layer or a block's linears:
GPTQ, AWQ, SmoothQuant (and the scale folding they share). The recipe steps that drive them
block by block are in :mod:`lowbit.algorithms.steps`."""

from lowbit.algorithms.awq import awq_clip, awq_scales, awq_search
from lowbit.algorithms.gptq import GPTQResult, HessianAccumulator, gptq_quantize_weight
from lowbit.algorithms.smoothing import GroupProbe, fold_scales
from lowbit.algorithms.smoothquant import smooth_group, smoothquant_scales

__all__ = ["GPTQResult", "GroupProbe", "HessianAccumulator", "awq_clip", "awq_scales",
           "awq_search", "fold_scales", "gptq_quantize_weight", "smooth_group",
           "smoothquant_scales"]
