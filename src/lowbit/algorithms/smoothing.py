"""Per-input-channel scaling folded into the preceding module (SmoothQuant and AWQ).

``Y = X W^T = (X diag(s)^-1) (W diag(s))^T``: the linears' weight columns are multiplied by
``s`` and the module that produced ``X`` divides its output by ``s`` — a norm's weight (and
bias), or the output rows of a preceding linear — so that, before quantization, the block
computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.adapters import InputGroup, norm_offset
from lowbit.nn.modules import QuantMixin


def weight_2d(m: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as a ``[out, in]`` view."""
    if isinstance(m, QuantMixin):
        return m.weight_2d()
    if type(m).__name__ == "Conv1D":
        return m.weight.t()
    return m.weight.reshape(m.weight.shape[0], -1)


def _touch(m: nn.Module) -> None:
    if isinstance(m, QuantMixin):
        m.invalidate_weight_cache()


@torch.no_grad()
def fold_scales(block: nn.Module, group: InputGroup, s: torch.Tensor) -> None:
    """Scale the group's input channels by ``1/s`` upstream and its weights by ``s``."""
    prev = block.get_submodule(group.prev)
    s = s.float()
    if group.prev_kind == "norm":
        off = norm_offset(prev)
        w = prev.weight
        w.copy_(((w.float() + off) / s - off).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    else:
        w2 = weight_2d(prev)
        w2.copy_((w2.float() / s[:, None]).to(w2.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
        _touch(prev)
    for name in group.linears:
        m = block.get_submodule(name)
        w2 = weight_2d(m)
        w2.copy_((w2.float() * s[None, :]).to(w2.dtype))
        _touch(m)


def capture_inputs(block: nn.Module, names: list[str], run) -> dict[str, list[torch.Tensor]]:
    """Inputs ``[tokens, in]`` (float32) of the named linears while ``run()`` runs the block."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = []
    for n in names:
        m = block.get_submodule(n)
        hs.append(m.register_forward_pre_hook(
            lambda mod, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1])
                                              .float())))
    try:
        run()
    finally:
        for h in hs:
            h.remove()
    return got
