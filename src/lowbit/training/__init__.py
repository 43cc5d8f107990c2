"""Training with quantization: QAT/QAD on fake-quantized models, and FP8 training.

QAT (quantization-aware training), see :mod:`lowbit.training.qat`:

* :func:`prepare_qat` -- PTQ-quantize a model (or take a quantized one) and make its
  quantizers trainable: straight-through estimator, scales ``"frozen"`` (default),
  ``"learnable"`` (LSQ) or ``"absmax"``;
* :func:`distill_loss` -- KL(teacher || student) for quantization-aware distillation (QAD);
  :class:`lowbit.training.hf.QADTrainer` for transformers' Trainer;
* :func:`finalize_qat` -- learned scales become ordinary buffers; then ``lowbit.save``.

FP8 training with delayed scaling, see :mod:`lowbit.training.fp8`:

* :func:`fp8_autocast` / :func:`convert_to_fp8` -- ``nn.Linear`` -> :class:`Fp8Linear`
  (E4M3 activations/weights, E5M2 gradients, per-tensor amax histories);
* :class:`Fp8Recipe` -- format, scaling (delayed/current), history length, margin.
"""

from lowbit.training.distill import distill_loss
from lowbit.training.fp8 import (Fp8Linear, Fp8Tensor, convert_from_fp8, convert_to_fp8,
                                 fp8_autocast, fp8_layers, fp8_mm, quantize_fp8)
from lowbit.training.fp8_scaling import AmaxHistory, Fp8Meta, Fp8Recipe
from lowbit.training.lsq import learnable_fake_quant
from lowbit.training.qat import (QATQuantizer, finalize_qat, param_groups, prepare_qat,
                                 scale_parameters)

__all__ = [
    "AmaxHistory", "Fp8Linear", "Fp8Meta", "Fp8Recipe", "Fp8Tensor", "QATQuantizer",
    "convert_from_fp8", "convert_to_fp8", "distill_loss", "finalize_qat", "fp8_autocast",
    "fp8_layers", "fp8_mm", "learnable_fake_quant", "param_groups", "prepare_qat",
    "quantize_fp8", "scale_parameters",
]
