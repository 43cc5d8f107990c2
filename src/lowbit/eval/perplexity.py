"""Perplexity, and the comparison of a model with its baseline.

Perplexity is ``exp(mean NLL)``, the NLL in nats per token averaged over the scored next-token
predictions (natural log; ``log2(ppl)`` is bits per token).

Windows: by default ``stride == seq_len``, non-overlapping windows of ``seq_len`` tokens taken
from the start of ``ids``; each window is scored on all its ``seq_len - 1`` next-token
predictions (the first token of a window has no context and is not scored). With
``stride < seq_len`` the windows slide by ``stride`` and each window after the first scores
only the tokens no earlier window scored (its last ``stride`` tokens), each with at least
``seq_len - stride`` tokens of context: the standard sliding-window evaluation. Only full
windows are used. Log-probabilities are computed in float32 whatever the model's dtype; sums
are accumulated in float64.

Works with any Hugging Face causal LM (``model(input_ids).logits``, ``[b, L, vocab]``), or a
module returning the logits tensor itself.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError


def _windows(n: int, seq_len: int, stride: int, n_windows: int | None):
    """``[(start, end, first)]``: window ``ids[start:end]`` scores the tokens at window
    positions ``first .. seq_len - 1`` (``first >= 1``)."""
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


def _check(model, ids: torch.Tensor, seq_len: int, n_windows: int | None) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ConfigError(f"ids must be integer token ids, got dtype {ids.dtype}")
    ids = ids.reshape(-1).long()
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (one context token and one scored "
                          f"token), got {seq_len}")
    if n_windows is not None and n_windows < 1:
        raise ConfigError(f"n_windows must be at least 1 (or None for every window), got "
                          f"{n_windows}")
    cfg = getattr(model, "config", None)
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(ctx, int) and seq_len > ctx:
        raise ConfigError(f"seq_len {seq_len} is beyond the model's context of {ctx} tokens")
    if ids.numel() < seq_len:
        raise ConfigError(f"{ids.numel()} tokens are fewer than one window of seq_len="
                          f"{seq_len}: use more text or a shorter seq_len")
    return ids


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _logprobs(model, x: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities ``[b, L - 1, vocab]`` of the next tokens of ``x [b, L]``."""
    out = model(x.to(_device(model)))
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def perplexity(model, ids: torch.Tensor, seq_len: int = 512, n_windows: int | None = 32,
               stride: int | None = None, batch_size: int = 1,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of a causal LM on token ids.

    Args:
        model: a causal LM; ``model(input_ids [b, L]).logits`` is ``[b, L, vocab]``.
        ids: token ids ``LongTensor [n]`` (e.g. the held-out part from
            :func:`lowbit.data.split_tokens`).
        seq_len: window length in tokens (default 512).
        n_windows: at most this many windows from the start of ``ids`` (default 32);
            ``None`` uses every full window.
        stride: tokens between window starts; default ``seq_len`` (non-overlapping). With
            ``stride < seq_len`` only the tokens not scored by an earlier window are scored.
        batch_size: windows per forward pass (same result, more memory).
        progress: ``progress(done_windows, total_windows)`` after each forward pass.

    Returns:
        ``{"ppl": exp(nll), "nll": mean NLL in nats/token, "tokens": number of scored
        tokens, "windows": number of windows, "seq_len": seq_len, "stride": stride}``.
        Non-overlapping: ``tokens == windows * (seq_len - 1)``.

    Runs under ``torch.no_grad()`` with the model in eval mode (its mode is restored).
    Raises :class:`~lowbit.errors.ConfigError` when ``ids`` is shorter than one window.
    """
    ids = _check(model, ids, seq_len, n_windows)
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    wins = _windows(ids.numel(), seq_len, stride, n_windows)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(wins), batch_size):
                chunk = wins[i:i + batch_size]
                x = torch.stack([ids[s:e] for s, e, _ in chunk])
                logp = _logprobs(model, x)
                y = x[:, 1:].to(logp.device)
                nll = -logp.gather(-1, y[..., None]).squeeze(-1)  # [b, L-1]; row j predicts y[j]
                for row, (_, _, first) in zip(nll, chunk):
                    scored = row[first - 1:]
                    total += float(scored.double().sum())
                    count += scored.numel()
                del logp, nll
                if progress is not None:
                    progress(min(i + batch_size, len(wins)), len(wins))
    finally:
        model.train(was_training)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(wins),
            "seq_len": seq_len, "stride": stride}


def compare(model, baseline, ids: torch.Tensor, seq_len: int = 512,
            n_windows: int | None = 8,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Compare ``model`` with ``baseline`` on the same non-overlapping windows of ``ids [n]``.

    Every window's ``seq_len - 1`` next-token predictions are scored by both models.

    Returns:
        ``{"ppl": model's perplexity, "baseline_ppl", "delta_pct": 100 * (ppl / baseline_ppl
        - 1), "nll", "baseline_nll" (nats/token), "mean_kl": mean over positions of
        KL(baseline || model) of the next-token distributions (nats), "top1_agreement":
        fraction of positions where both models' most likely next token is the same,
        "tokens": scored positions, "windows", "seq_len"}``.

    Both models run under ``torch.no_grad()`` in eval mode (modes restored); log-softmax in
    float32. ``progress(done, total)`` after each window.
    """
    ids = _check(model, ids, seq_len, n_windows)
    _check(baseline, ids, seq_len, n_windows)
    wins = _windows(ids.numel(), seq_len, seq_len, n_windows)
    modes = (model.training, baseline.training)
    model.eval()
    baseline.eval()
    nll_m = nll_b = kl = agree = 0.0
    n = 0
    try:
        with torch.no_grad():
            for i, (s, e, _) in enumerate(wins):
                x = ids[s:e][None]
                lm = _logprobs(model, x)[0].cpu()
                lb = _logprobs(baseline, x)[0].cpu()
                y = x[0, 1:, None]
                nll_m += float(-lm.gather(-1, y).double().sum())
                nll_b += float(-lb.gather(-1, y).double().sum())
                pb = lb.exp()
                kl += float(torch.where(pb > 0, pb * (lb - lm), 0.0).sum(-1).double().sum())
                agree += float((lm.argmax(-1) == lb.argmax(-1)).sum())
                n += y.shape[0]
                del lm, lb
                if progress is not None:
                    progress(i + 1, len(wins))
    finally:
        model.train(modes[0])
        baseline.train(modes[1])
    ppl_m, ppl_b = math.exp(nll_m / n), math.exp(nll_b / n)
    return {"ppl": ppl_m, "baseline_ppl": ppl_b, "delta_pct": 100 * (ppl_m / ppl_b - 1),
            "nll": nll_m / n, "baseline_nll": nll_b / n, "mean_kl": kl / n,
            "top1_agreement": agree / n, "tokens": n, "windows": len(wins),
            "seq_len": seq_len}
