"""Perplexity and the comparison of a model with its baseline.

Perplexity is ``exp(mean NLL)`` in nats per token over the scored next-token predictions.
Default: non-overlapping windows of ``seq_len`` tokens from the start of ``ids``, each scored
on its ``seq_len - 1`` predictions. With ``stride < seq_len`` the windows slide and only the
tokens not scored by an earlier window are scored (the standard sliding-window evaluation).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError


def _windows(n: int, seq_len: int, stride: int, n_windows: int | None):
    """(start, end, first scored position within the window) for each window."""
    out = []
    prev_end = 0
    start = 0
    while start + seq_len <= n and (n_windows is None or len(out) < n_windows):
        end = start + seq_len
        first = 1 if not out else max(1, prev_end - start)
        out.append((start, end, first))
        prev_end = end
        start += stride
    return out


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out).float()


def perplexity(model, ids: torch.Tensor, seq_len: int = 512, n_windows: int | None = 32,
               stride: int | None = None, batch_size: int = 1,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of ``model`` on token ids ``LongTensor [n]``.

    Returns ``{"ppl", "nll" (mean nats/token), "tokens" (scored), "windows", "seq_len"}``.
    ``n_windows=None`` uses every full window.
    """
    ids = ids.reshape(-1)
    stride = stride or seq_len
    if stride < 1 or stride > seq_len:
        raise ConfigError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    wins = _windows(ids.numel(), seq_len, stride, n_windows)
    if not wins:
        raise ConfigError(f"{ids.numel()} tokens are fewer than one window of {seq_len}")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(wins), batch_size):
            chunk = wins[i:i + batch_size]
            x = torch.stack([ids[s:e] for s, e, _ in chunk]).to(dev)
            logp = F.log_softmax(_logits(model, x)[:, :-1], dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # [b, L-1], predicts x[1:]
            for row, (_, _, first) in zip(nll, chunk):
                scored = row[first - 1:]
                total += float(scored.double().sum())
                count += scored.numel()
            if progress is not None:
                progress(min(i + batch_size, len(wins)), len(wins))
    model.train(was)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(wins),
            "seq_len": seq_len}


def compare(model, baseline, ids: torch.Tensor, seq_len: int = 512,
            n_windows: int | None = 8) -> dict:
    """Perplexities of ``model`` and ``baseline`` on the same windows, the relative delta
    (%), the mean KL(baseline || model) of next-token distributions (nats) and the top-1
    agreement (fraction of positions where both predict the same token)."""
    ids = ids.reshape(-1)
    wins = _windows(ids.numel(), seq_len, seq_len, n_windows)
    if not wins:
        raise ConfigError(f"{ids.numel()} tokens are fewer than one window of {seq_len}")
    nll_m = nll_b = kl = agree = 0.0
    n = 0
    with torch.no_grad():
        for s, e, _ in wins:
            x = ids[s:e][None]
            lm = F.log_softmax(_logits(model, x)[0, :-1], -1)
            lb = F.log_softmax(_logits(baseline, x)[0, :-1], -1)
            y = x[0, 1:]
            nll_m += float(-lm.gather(-1, y[:, None]).double().sum())
            nll_b += float(-lb.gather(-1, y[:, None]).double().sum())
            kl += float((lb.exp() * (lb - lm)).sum(-1).double().sum())
            agree += float((lm.argmax(-1) == lb.argmax(-1)).double().sum())
            n += y.numel()
    ppl_m, ppl_b = math.exp(nll_m / n), math.exp(nll_b / n)
    return {"ppl": ppl_m, "baseline_ppl": ppl_b, "delta_pct": 100 * (ppl_m / ppl_b - 1),
            "mean_kl": kl / n, "top1_agreement": agree / n, "tokens": n}
