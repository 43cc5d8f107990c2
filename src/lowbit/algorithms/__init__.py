"""Quantization algorithms as pure functions over a layer or a block's linears:
GPTQ, AWQ, SmoothQuant (and the scale folding they share), and the rotations of a whole
model (:mod:`lowbit.algorithms.rotate`: ``rotation_layout``, ``fold_norms``,
``apply_rotations``). The recipe steps that drive them are in :mod:`lowbit.algorithms.steps`
and :mod:`lowbit.algorithms.rotate`."""

from lowbit.algorithms.awq import awq_clip, awq_scales, awq_search
from lowbit.algorithms.gptq import GPTQResult, HessianAccumulator, gptq_quantize_weight
from lowbit.algorithms.rotate import apply_rotations
from lowbit.algorithms.rotate_layout import RotationLayout, fold_norms, rotation_layout
from lowbit.algorithms.smoothing import GroupProbe, fold_scales
from lowbit.algorithms.smoothquant import smooth_group, smoothquant_scales

__all__ = ["GPTQResult", "GroupProbe", "HessianAccumulator", "RotationLayout",
           "apply_rotations", "awq_clip", "awq_scales", "awq_search", "fold_norms",
           "fold_scales", "gptq_quantize_weight", "rotation_layout", "smooth_group",
           "smoothquant_scales"]
