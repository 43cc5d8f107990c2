"""Quantization-aware training: make the quantizers of a PTQ model trainable.

>>> from lowbit.training import prepare_qat, finalize_qat
>>> prepare_qat(model, "w4a8", forward_loop, group_size=64)      # doctest: +SKIP
>>> ...  # train with any loop or transformers' Trainer
>>> finalize_qat(model); lowbit.save(model, "out/")              # doctest: +SKIP

:func:`prepare_qat` quantizes the model with :func:`lowbit.quantize` (or takes one already
quantized), then turns every :class:`~lowbit.nn.TensorQuantizer` into a
:class:`QATQuantizer`. Every quantizer fake-quantizes with the straight-through estimator, so
the weights train through it. ``scales`` picks what happens to the scales:

* ``"frozen"`` (default): weight scales are fixed to their PTQ values (AbsMax of the
  starting weights, or GPTQ/AWQ's), static activation ranges to their calibrated ``amax``;
* ``"learnable"``: the same starting values become ``nn.Parameter`` s trained with the LSQ
  gradient (:mod:`lowbit.training.lsq`): weight scales (``weight_quantizer.scale``, stored
  layout, e.g. ``[out, in / group]``) and the ranges of static symmetric activation
  quantizers (``input_quantizer.amax``); block-scaled formats (NVFP4, MX) stay frozen;
* ``"absmax"``: weight scales follow the AbsMax of the current weights at every step (as in
  PTQ); activation ranges frozen.

Dynamic activation quantizers compute their scales per input in every mode.
:func:`finalize_qat` turns learned parameters back into the ordinary buffers, so
``lowbit.save`` / ``lowbit.export`` see a plain PTQ model with fixed scales.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import nn

from lowbit.core import fake_quant, quantize as quantize_tensor
from lowbit.errors import ConfigError
from lowbit.nn.modules import QuantMixin
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.nn.utils import quantizers
from lowbit.training.lsq import check_learnable, effective_scale, learnable_fake_quant

ScaleMode = Literal["frozen", "learnable", "absmax"]
SCALE_MODES = ("frozen", "learnable", "absmax")


class QATQuantizer(TensorQuantizer):
    """A :class:`TensorQuantizer` whose scale (``learn == "scale"``, weights) or range
    (``learn == "amax"``, static activations) is an ``nn.Parameter``; ``learn == "none"``
    behaves exactly as a TensorQuantizer. Made in place by :func:`prepare_qat`."""

    learn: str = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (any shape) with the learnable parameter; same shape/dtype."""
        if self.mode != "quantizing" or (self.needs_calibration and self.amax is None):
            return super().forward(x)  # pass-through, calibration, or its clear error
        spec = self.spec
        if spec.granularity == "channel" and self.role != "weight":
            spec = spec.model_copy(update={"axis": self._channel_axis(x)})
        if self.learn == "none":
            # TensorQuantizer.forward, without its full-tensor NaN/Inf check at every step
            # (a training step's NaN shows in the loss); same values
            if self.scale is not None:
                return fake_quant(x, spec, scale=self.scale, zero_point=self.zero_point,
                                  global_scale=self.global_scale, check_finite=False)
            amax = None if (spec.dynamic or self.role == "weight") else self.amax
            return fake_quant(x, spec, amax=amax, amin=None if amax is None else self.amin,
                              check_finite=False)
        if not torch.is_grad_enabled():
            if self.learn == "scale":
                return fake_quant(x, spec, scale=effective_scale(self.scale, spec),
                                  zero_point=self.zero_point)
            return fake_quant(x, spec, amax=self.amax.detach())
        if self.learn == "scale":
            return learnable_fake_quant(x, spec, scale=self.scale, zero_point=self.zero_point)
        return learnable_fake_quant(x, spec, amax=self.amax)

    def set_amax(self, amax: torch.Tensor, amin: torch.Tensor | None = None) -> None:
        """As :meth:`TensorQuantizer.set_amax`; a learnable range is overwritten in place."""
        if isinstance(self.amax, nn.Parameter):
            with torch.no_grad():
                self.amax.copy_(torch.as_tensor(amax, dtype=torch.float32).reshape(
                    self.amax.shape))
            return
        super().set_amax(amax, amin)

    def set_fixed_scale(self, scale, zero_point=None, global_scale=None) -> None:
        """As :meth:`TensorQuantizer.set_fixed_scale`; a learnable scale is overwritten in
        place."""
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.copy_(scale.reshape(self.scale.shape))
            return
        super().set_fixed_scale(scale, zero_point, global_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", learn={self.learn}" if self.learn != "none" else "")


def _to_parameter(q: nn.Module, name: str) -> None:
    t = q._buffers.pop(name)
    q.register_parameter(name, nn.Parameter(t.detach().float().clone()))


def _to_buffer(q: nn.Module, name: str, value: torch.Tensor) -> None:
    q._parameters.pop(name)
    q.register_buffer(name, value.detach().clone())


def _freeze_weight_scale(m: QuantMixin) -> None:
    """Fix the weight quantizer's scales to what PTQ computes from the current weight."""
    q = m.weight_quantizer
    if q.scale is not None:  # GPTQ/AWQ or a loaded checkpoint fixed them already
        return
    with torch.no_grad():
        qt = quantize_tensor(m.weight_2d().detach(), q.spec)
    q.set_fixed_scale(qt.scale, qt.zero_point, qt.global_scale)


def _learn_kind(name: str, q: TensorQuantizer, scales: str) -> str:
    """What ``q`` learns under ``scales`` ("scale", "amax" or "none")."""
    if scales != "learnable" or q.spec is None or q.spec.block_format is not None:
        return "none"
    if q.role == "weight":
        return "scale"
    if q.needs_calibration and q.spec.symmetric and q.amax is not None:
        check_learnable(q.spec, "amax", name)
        return "amax"
    return "none"


def prepare_qat(model: nn.Module, recipe: "str | dict | Any | None" = None,
                forward_loop: Callable[[nn.Module], Any] | None = None, *,
                scales: ScaleMode = "frozen", calib_data: Any = None,
                **overrides: Any) -> nn.Module:
    """Make ``model`` ready for quantization-aware training (in place); returns it.

    Args:
        model: an unquantized ``nn.Module`` (then ``recipe`` is required and
            :func:`lowbit.quantize` runs first with ``forward_loop`` / ``calib_data`` /
            ``overrides``), or a model already quantized by lowbit (then ``recipe`` is None).
        recipe: preset name, YAML path, dict or Recipe (see :func:`lowbit.quantize`).
        forward_loop: ``callable(model)`` over calibration data, for static activations.
        scales: ``"frozen"``, ``"learnable"`` or ``"absmax"`` (see the module doc).
        calib_data: token ids ``[n, seq]`` instead of ``forward_loop``.
        **overrides: recipe overrides (``group_size=64``...; see :func:`lowbit.recipes.load`;
            an unknown name is a ConfigError). Only with ``recipe``.

    Afterwards ``model.lowbit_qat`` lists the quantizers by what they do
    (``{"learnable": [...], "frozen": [...], "absmax": [...], "dynamic": [...]}``) and
    :func:`scale_parameters` returns the learnable scales (e.g. for their own learning rate).
    The model's train/eval mode is left as it was.
    """
    if scales not in SCALE_MODES:
        raise ConfigError(f"scales must be one of {', '.join(SCALE_MODES)}; got {scales!r}")
    already = any(isinstance(m, QuantMixin) for m in model.modules())
    if recipe is not None:
        if already:
            raise ConfigError("the model is already quantized: pass recipe=None to train its "
                              "quantizers, or start from the unquantized model")
        from lowbit.pipeline import quantize

        quantize(model, recipe, forward_loop, calib_data=calib_data, **overrides)
    elif not already:
        raise ConfigError("the model has no quantizers: pass a recipe (e.g. 'w4a8') or "
                          "quantize it with lowbit.quantize first")
    elif overrides or calib_data is not None or forward_loop is not None:
        given = sorted(overrides) + [k for k, v in (("forward_loop", forward_loop),
                                                    ("calib_data", calib_data)) if v is not None]
        raise ConfigError(f"prepare_qat(recipe=None): the model is already quantized, so "
                          f"{', '.join(given)} would not be used (only quantizing with a "
                          "recipe uses them); drop them or start from the unquantized model")
    if any(isinstance(q, QATQuantizer) for _, q in quantizers(model)):
        raise ConfigError("prepare_qat was already applied to this model; call finalize_qat "
                          "first to prepare it again")
    report: dict[str, list[str]] = {"learnable": [], "frozen": [], "absmax": [], "dynamic": []}
    owners = {id(m.weight_quantizer): m for m in model.modules() if isinstance(m, QuantMixin)}
    for name, q in list(quantizers(model)):
        if q.spec is None:
            continue
        kind = _learn_kind(name, q, scales)
        if q.role == "weight" and id(q) in owners:
            m = owners[id(q)]
            if scales == "absmax" and q.scale is None:
                report["absmax"].append(name)
            else:
                _freeze_weight_scale(m)
                m.invalidate_weight_cache()
                if kind == "none":
                    report["frozen"].append(name)
        elif q.spec.dynamic or not q.needs_calibration:
            report["dynamic"].append(name)
        elif kind == "none":
            report["frozen"].append(name)
        q.__class__ = QATQuantizer
        q.learn = kind
        if kind != "none":
            _to_parameter(q, kind)
            report["learnable"].append(name)
    if scales == "learnable" and not report["learnable"]:
        raise ConfigError("scales='learnable' but no quantizer has a learnable scale (block-"
                          "scaled formats and dynamic quantizers have none); use 'frozen'")
    model.lowbit_qat = report
    return model


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable scales and ranges of a model prepared with ``scales="learnable"``."""
    out = []
    for _, q in quantizers(model):
        if isinstance(q, QATQuantizer) and q.learn != "none":
            out.append(getattr(q, q.learn))
    return out


def param_groups(model: nn.Module, lr: float, scale_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: the model's trainable parameters at ``lr`` (with
    ``weight_decay``) and the learnable scales at ``scale_lr`` (default ``lr``, no decay)."""
    sp = {id(p) for p in scale_parameters(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in sp]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if sp:
        groups.append({"params": scale_parameters(model), "lr": scale_lr or lr,
                       "weight_decay": 0.0})
    return groups


def finalize_qat(model: nn.Module) -> nn.Module:
    """End QAT (in place; returns ``model``): learned weight scales become fixed scales
    (``weight_quantizer.scale`` buffers, rounded to the spec's scale format), learned
    activation ranges become ``amax`` buffers, and every :class:`QATQuantizer` becomes a
    plain :class:`TensorQuantizer` again. The model then exports as any PTQ model, and its
    outputs are unchanged (bit for bit)."""
    for _, q in quantizers(model):
        if not isinstance(q, QATQuantizer):
            continue
        if q.learn == "scale":
            _to_buffer(q, "scale", effective_scale(q.scale, q.spec))
        elif q.learn == "amax":
            _to_buffer(q, "amax", q.amax.detach().float())
        q.__class__ = TensorQuantizer
        q.__dict__.pop("learn", None)
    for m in model.modules():
        if isinstance(m, QuantMixin):
            m.invalidate_weight_cache()
    model.__dict__.pop("lowbit_qat", None)
    return model

