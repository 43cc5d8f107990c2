"""Quantization-aware distillation (QAD): match the full-precision teacher's distribution.

>>> with torch.no_grad():                                                   # doctest: +SKIP
...     t = teacher(ids).logits
>>> loss = distill_loss(student(ids).logits, t, T=1.0)                      # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(teacher || student) of the softened next-token distributions, times ``T**2``.

    Args:
        student_logits: ``[..., vocab]`` (e.g. ``[batch, seq, vocab]``), any float dtype.
        teacher_logits: same shape (computed without gradient).
        T: temperature (> 0); both distributions are ``softmax(logits / T)``. The ``T**2``
            factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
        mask: optional bool/0-1 tensor of the leading shape ``[...]``: positions to average
            over (e.g. the attention mask); default all.

    Returns:
        A scalar float32 tensor, in nats per position (0 when the distributions agree).
        Log-softmax is computed in float32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"distill_loss: student logits {list(student_logits.shape)} and "
                          f"teacher logits {list(teacher_logits.shape)} differ in shape")
    if not T > 0:
        raise ConfigError(f"distill_loss: temperature T must be positive, got {T}")
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # [...]
    if mask is not None:
        if mask.shape != kl.shape:
            raise ConfigError(f"distill_loss: mask shape {list(mask.shape)} does not match the "
                              f"positions {list(kl.shape)}")
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1.0) * (T * T)
    return kl.mean() * (T * T)
