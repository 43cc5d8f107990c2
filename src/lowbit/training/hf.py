"""transformers integration: a Trainer that distills from the full-precision teacher (QAD).

QAT itself needs nothing special: a model from :func:`lowbit.training.prepare_qat` is an
ordinary ``nn.Module`` whose learnable scales are ordinary parameters, so the stock
``transformers.Trainer`` trains it. :class:`QADTrainer` adds the distillation loss.
Importing this module imports transformers.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from lowbit.errors import ConfigError
from lowbit.training.distill import distill_loss


class QADTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``alpha * KL(teacher || student) * T**2 +
    (1 - alpha) * cross-entropy`` (the cross-entropy only when ``labels`` are given).

    Extra keyword arguments: ``teacher`` (the full-precision model, kept in eval mode, no
    gradient), ``temperature`` (default 1.0), ``alpha`` (default 1.0: pure distillation).
    """

    def __init__(self, *args, teacher: torch.nn.Module, temperature: float = 1.0,
                 alpha: float = 1.0, **kwargs):
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"QADTrainer: alpha must be in [0, 1], got {alpha}")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Distillation (+ optional cross-entropy) loss of one batch (a scalar)."""
        dev = next(model.parameters()).device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        labels = inputs.get("labels") if self.alpha < 1.0 else None
        fwd = {k: v for k, v in inputs.items() if k != "labels" or labels is not None}
        out = model(**fwd)
        with torch.no_grad():
            t = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        mask = inputs.get("attention_mask")
        loss = distill_loss(out.logits, t, self.temperature,
                            None if mask is None else mask.bool())
        if labels is not None:
            loss = self.alpha * loss + (1.0 - self.alpha) * out.loss
        return (loss, out) if return_outputs else loss
