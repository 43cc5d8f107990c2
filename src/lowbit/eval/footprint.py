"""Weight memory of a (quantized) model: what its weights occupy once stored packed.

For every parameter: quantized weights count ``numel * bits / 8`` bytes for the codes plus
their scales (and zero-points, and NVFP4's per-tensor scale) in their storage formats; other
parameters count their dtype's size. Tied parameters (e.g. embeddings shared with the LM
head) count once.
"""

from __future__ import annotations

import math

from torch import nn

from lowbit.core import Layout
from lowbit.nn.modules import QuantMixin


def quantized_weight_bytes(module: QuantMixin) -> float:
    """Bytes of ``module``'s weight stored as codes + scales (its float size if unquantized)."""
    q = module.weight_quantizer
    w = module.weight
    if not q.is_enabled:
        return w.numel() * w.element_size()
    spec = q.spec
    shape = tuple(module.weight_2d().shape)
    n_scales = math.prod(Layout(spec, shape).natural_shape()) if spec.granularity != "tensor" \
        else 1
    b = w.numel() * spec.bits / 8 + n_scales * spec.scale_bits() / 8
    if not spec.symmetric:
        b += n_scales * spec.bits / 8
    if spec.block_format is not None and spec.block_format.global_scale:
        b += 4
    return b


def weight_footprint(model: nn.Module) -> dict:
    """``{"bytes", "params", "quantized_params", "bits_per_weight"}`` for ``model``'s weights.

    ``bits_per_weight`` is averaged over all parameters (quantized or not), scales included.
    """
    seen: set[int] = set()
    total = 0.0
    params = qparams = 0
    for m in model.modules():
        if isinstance(m, QuantMixin) and m.weight.data_ptr() not in seen:
            seen.add(m.weight.data_ptr())
            total += quantized_weight_bytes(m)
            params += m.weight.numel()
            if m.weight_quantizer.is_enabled:
                qparams += m.weight.numel()
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
        params += p.numel()
    return {"bytes": total, "params": params, "quantized_params": qparams,
            "bits_per_weight": 8 * total / max(params, 1)}
