"""Packed loading: a native checkpoint's codes go straight into :class:`PackedLinear` layers.

Used by ``lowbit.load(path, packed=True)`` (:func:`lowbit.export.native.load`): the model is
built from ``config.json`` without weight initialisation (its float weights are allocated but
never written, so their pages are never touched), quantizers are inserted with the stored
specs, and every quantized linear layer is replaced by a packed layer built from the stored
codes and scales, on the target device, before anything else is loaded. The float weights of
those layers are never filled and are released with the replaced modules, so peak memory is
the checkpoint plus the packed model. ``nn.Conv2d`` layers with int8 weights become
:class:`~lowbit.runtime.conv.PackedConv2d` the same way; other quantized layers that are
not ``nn.Linear`` (other convs, GPT-2's ``Conv1D``) are loaded as in the ordinary load
(dequantized float weights, fake-quantized), as :func:`lowbit.runtime.convert` leaves them.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.export.native import qtensor_from
from lowbit.nn.modules import QuantLinear, QuantMixin
from lowbit.runtime import packed_module, replace_module
from lowbit.runtime.conv import packed_conv


OPTIONS = ("fast", "act_dtype")


def install_packed(model: nn.Module, quantized: dict, tensors: dict[str, torch.Tensor],
                   device="cpu", options: dict | None = None) -> set[str]:
    """Replace each quantized linear (and int8 Conv2d) of ``model`` named in ``quantized``
    (the checkpoint's ``"quantized"`` metadata) by a packed layer built from ``tensors``
    (``{name}.weight.codes`` ...) on ``device``; returns the names of the replaced modules.

    The packed layers' biases are left for the caller's ``load_state_dict`` (their keys are
    unchanged). ``options``: ``fast`` and ``act_dtype`` of :func:`lowbit.runtime.convert`.
    """
    options = dict(options or {})
    bad = [k for k in options if k not in OPTIONS]
    if bad:
        raise ConfigError(f"packed: unknown option {bad[0]!r}; expected some of: "
                          f"{', '.join(OPTIONS)}")
    fast, act_dtype = options.get("fast", True), options.get("act_dtype")
    done: set[str] = set()
    for name, qm in quantized.items():
        m = model.get_submodule(name)
        if not isinstance(m, QuantMixin):
            continue
        qt = qtensor_from(qm, tensors, f"{name}.weight")
        if isinstance(m, QuantLinear):
            new = packed_module(m, qt, fast, act_dtype, device)
        else:
            new = packed_conv(m, qt, device)
        if new is None:  # an output quantizer: keep the fake-quantized layer
            continue
        del m
        replace_module(model, name, new)
        done.add(name)
    return done


def allowed_missing(key: str, packed: set[str]) -> bool:
    """Whether state-dict key ``key`` is a packed layer's own buffer (not in a checkpoint,
    which stores codes under ``{name}.weight.*``): everything of the layer but its bias."""
    mod, _, attr = key.rpartition(".")
    return mod in packed and attr != "bias"
