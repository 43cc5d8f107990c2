"""Fold each BatchNorm into the convolution before it, so the quantized weight is the deployed one.

>>> pairs = fold_batchnorm(model.eval(), (images,))   # before lowbit.quantize  # doctest: +SKIP

A BatchNorm in eval mode is a per-channel affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``; after a convolution it folds exactly into the convolution's
weight (``W * s`` per output channel) and bias (``(b - mean) * s + beta``), and the BatchNorm
becomes ``nn.Identity``. Quantizing after folding quantizes the weights an engine runs, and
the ONNX graph has no BatchNormalization left.

Pairs are found by one forward pass on ``example_inputs`` with hooks (no tracing): a
BatchNorm whose input *is* the output tensor of an ``nn.Conv1d``/``nn.Conv2d``, each called
once. The folded model's output is then compared with the original's on the same inputs;
when it differs (a convolution output also used elsewhere, e.g. by functional code), nothing
is changed and a ConfigError names the pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.nn.modules import QuantMixin

CONVS = (nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
RTOL = 1e-4  # allowed change of the output, relative to its largest magnitude


def find_conv_bn_pairs(model: nn.Module, example_inputs: tuple) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` pairs where the BatchNorm's input is the conv's output
    tensor in a forward pass on ``example_inputs`` (each module called once)."""
    names = {id(m): n for n, m in model.named_modules()}
    outs: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    seen: list[tuple[str, str]] = []

    def conv_hook(m, a, out):
        n = names[id(m)]
        calls[n] = calls.get(n, 0) + 1
        outs[id(out)] = (n, out)  # the tensor is kept, so its id is not reused

    def bn_hook(m, a):
        n = names[id(m)]
        calls[n] = calls.get(n, 0) + 1
        hit = outs.get(id(a[0]))
        if hit is not None and hit[1] is a[0]:
            seen.append((hit[0], n))

    hooks = []
    for m in model.modules():
        if type(m) in CONVS:
            hooks.append(m.register_forward_hook(conv_hook))
        elif type(m) in NORMS and m.running_var is not None:  # else batch statistics
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return [(c, b) for c, b in seen if calls[c] == 1 and calls[b] == 1]


def fold_batchnorm(model: nn.Module, example_inputs) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a convolution into it (in place).

    Args:
        model: an unquantized model in eval mode (BatchNorm's running statistics are used).
        example_inputs: a tensor or tuple of positional inputs for one forward pass.

    Returns the ``(conv, batchnorm)`` names folded; each BatchNorm is now ``nn.Identity``.
    Raises ConfigError for a model in training mode, an already quantized one, or when the
    folded model's output differs from the original's by more than ``RTOL`` of its largest
    magnitude (the model is then left unchanged).
    """
    if model.training:
        raise ConfigError("fold_batchnorm: the model is in training mode; call model.eval() "
                          "first (folding uses BatchNorm's running statistics)")
    if any(isinstance(m, QuantMixin) for m in model.modules()):
        raise ConfigError("fold_batchnorm: the model is already quantized; fold before "
                          "lowbit.quantize")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    pairs = find_conv_bn_pairs(model, args)
    if not pairs:
        return []
    with torch.no_grad():
        ref = model(*args)
    mods = dict(model.named_modules())
    saved = []
    for c, b in pairs:
        conv, bn = mods[c], mods[b]
        saved.append((conv, conv.weight.detach().clone(), conv.bias, b, bn))
        _fold(conv, bn)
        _set(model, b, nn.Identity())
    with torch.no_grad():
        out = model(*args)
    err = float((out - ref).abs().max())
    tol = RTOL * float(ref.abs().max().clamp_min(1e-12))
    if not err <= tol:
        for conv, w, bias, b, bn in saved:
            with torch.no_grad():
                conv.weight.copy_(w)
            conv.bias = bias
            _set(model, b, bn)
        raise ConfigError(f"fold_batchnorm: folding {len(pairs)} BatchNorm(s) changed the "
                          f"output by {err:.3g} (> {tol:.3g}); a convolution's output is also "
                          f"used elsewhere; pairs: {pairs[:4]}{' ...' if len(pairs) > 4 else ''}"
                          "; the model is unchanged")
    return pairs


def _fold(conv: nn.Module, bn: nn.Module) -> None:
    """``conv`` absorbs ``bn`` (float64 arithmetic, stored in the weight's dtype)."""
    w = conv.weight.detach().double()
    s = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(s)
    b = (b - bn.running_mean.double()) * s
    if bn.bias is not None:
        b = b + bn.bias.detach().double()
    with torch.no_grad():
        conv.weight.copy_((w * s.view(-1, *([1] * (w.dim() - 1)))).to(conv.weight.dtype))
    conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


__all__ = ["fold_batchnorm", "find_conv_bn_pairs"]
