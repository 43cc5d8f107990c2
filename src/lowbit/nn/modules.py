"""Quantized versions of Linear (and its subclasses), Conv1d/2d, transformers' GPT-2
``Conv1D`` and ``nn.MultiheadAttention`` (:mod:`lowbit.nn.mha`).

A module is made quantized *in place*: its class becomes the quantized subclass and three
quantizers are added (``input_quantizer``, ``weight_quantizer``, ``output_quantizer``). The
parameters are the same objects (no copy), so ``state_dict`` keys, hooks, tied weights and
optimizer references keep working; the quantizers only add keys.

Weights are always quantized as a 2-D matrix ``[out, in * kernel]`` (the transpose for
``Conv1D``, whose weight is stored ``[in, out]``): per-channel means per output channel
(axis 0) and groups run along the input dimension (axis -1), for every module type. In eval
/ no-grad mode the fake-quantized weight is cached until the weight changes.

Linears (``QuantLinear`` and GPT-2's ``QuantConv1D``) may hold an online
``input_rotation`` (:mod:`lowbit.nn.rotation`), applied to the input before the input
quantizer; layers without one have no such attribute and do not pay for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantSpec
from lowbit.nn.quantizer import TensorQuantizer


class QuantMixin:
    """Shared behaviour of the quantized module classes."""

    weight_transposed = False  # Conv1D stores [in, out]
    weight_name = "weight"  # the parameter the weight quantizer quantizes
    input_channel_axis = -1

    @classmethod
    def in_features_of(cls, module: nn.Module) -> int:
        """Input width of ``module``'s weight as a 2-D matrix (``in * kernel``), the axis
        groups run along; ``module`` may be the unquantized original."""
        w = getattr(module, cls.weight_name)
        return w.shape[0] if cls.weight_transposed else w[0].numel()

    def _init_quantizers(self, weight: QuantSpec | None, input: QuantSpec | None,
                         output: QuantSpec | None, name: str = "") -> None:
        if input is not None and input.granularity == "channel":
            input = input.model_copy(update={"axis": self.input_channel_axis})
        if output is not None and output.granularity == "channel":
            output = output.model_copy(update={"axis": self.output_channel_axis})
        self.input_quantizer = TensorQuantizer(input, "input", f"{name}.input_quantizer")
        self.weight_quantizer = TensorQuantizer(weight, "weight", f"{name}.weight_quantizer")
        self.output_quantizer = TensorQuantizer(output, "output", f"{name}.output_quantizer")
        self._wq_cache = None
        self._wq_key = None

    output_channel_axis = -1

    # --- weight as a 2-D matrix -----------------------------------------------------------
    def weight_2d(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as ``[out, in * kernel]`` (a view where possible)."""
        w = self.weight if w is None else w
        if self.weight_transposed:
            return w.t()
        return w.reshape(w.shape[0], -1)

    def weight_from_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_2d`."""
        if self.weight_transposed:
            return w2.t()
        return w2.reshape(self.weight.shape)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (cached in no-grad mode), same shape as ``weight``."""
        wq = self.weight_quantizer
        if not wq.is_enabled:
            return self.weight
        # a gradient is needed for the weight, or for a learnable scale (LSQ) of a frozen one
        training = torch.is_grad_enabled() and (
            self.weight.requires_grad or any(p.requires_grad for p in wq.parameters()))
        if training:
            return self.weight_from_2d(wq(self.weight_2d()))
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, id(wq.spec),
               wq.mode, None if wq.scale is None else (wq.scale.data_ptr(), wq.scale._version))
        if self._wq_key != key:
            with torch.no_grad():
                self._wq_cache = self.weight_from_2d(wq(self.weight_2d()))
            self._wq_key = key
        return self._wq_cache

    def invalidate_weight_cache(self) -> None:
        """Forget the cached fake-quantized weight (after editing the weight in place)."""
        self._wq_cache = None
        self._wq_key = None

    def quantizers(self):
        """(role, quantizer) pairs of this module."""
        return [("input", self.input_quantizer), ("weight", self.weight_quantizer),
                ("output", self.output_quantizer)]


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with input, weight and output quantizers (and an optional online
    ``input_rotation`` ``R``, see :mod:`lowbit.nn.rotation`)."""

    accepts_input_rotation = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = Qo(Qi(x R) @ Qw(W).T + b)`` (``R``: ``input_rotation``, when there is one);
        shapes as ``nn.Linear``."""
        rot = self._modules.get("input_rotation")
        if rot is not None:
            x = rot(x)
        return self.output_quantizer(F.linear(self.input_quantizer(x), self.quantized_weight(),
                                              self.bias))


class QuantConv1d(QuantMixin, nn.Conv1d):
    """``nn.Conv1d`` with quantizers; activation channels are axis 1."""

    input_channel_axis = 1
    output_channel_axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``nn.Conv1d`` with quantized input, weight and output."""
        return self.output_quantizer(self._conv_forward(self.input_quantizer(x),
                                                        self.quantized_weight(), self.bias))


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantizers; activation channels are axis 1."""

    input_channel_axis = 1
    output_channel_axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``nn.Conv2d`` with quantized input, weight and output."""
        return self.output_quantizer(self._conv_forward(self.input_quantizer(x),
                                                        self.quantized_weight(), self.bias))


def _gpt2_conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers absent
        return None

    class QuantConv1D(QuantMixin, Conv1D):
        """transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``) with quantizers."""

        weight_transposed = True
        accepts_input_rotation = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """``y = Qi(x R) @ Qw(W) + b`` with ``W`` of shape ``[in, out]`` (``R``: the
            ``input_rotation``, when there is one)."""
            size_out = x.size()[:-1] + (self.nf,)
            rot = self._modules.get("input_rotation")
            if rot is not None:
                x = rot(x)
            x = self.input_quantizer(x)
            y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight())
            return self.output_quantizer(y.view(size_out))

    return Conv1D, QuantConv1D


_LINEAR_SUBCLASSES: dict[type, type] = {}


def linear_subclass_class(cls: type) -> type | None:
    """The quantized class of a subclass ``cls`` of ``nn.Linear`` whose ``forward`` is
    ``nn.Linear.forward`` (torch's ``NonDynamicallyQuantizableLinear`` and the like): a class
    deriving from both :class:`QuantLinear` and ``cls`` (made once, cached), so
    ``isinstance(m, cls)`` still holds. None when ``cls`` overrides ``forward``: its own
    computation cannot be replaced by a quantized ``F.linear`` without changing it."""
    if cls.forward is not nn.Linear.forward:
        return None
    q = _LINEAR_SUBCLASSES.get(cls)
    if q is None:
        q = type(f"Quant{cls.__name__}", (QuantLinear, cls),
                 {"__doc__": f"``{cls.__qualname__}`` with quantizers (see QuantLinear).",
                  "__module__": __name__, "_lowbit_base": cls,
                  "__reduce_ex__": _reduce_linear_subclass})
        _LINEAR_SUBCLASSES[cls] = q
    return q


def _reduce_linear_subclass(self, protocol):
    """Pickle (``torch.save(model)``, ``copy.deepcopy``) an instance of a class made by
    :func:`linear_subclass_class` through its base class, which pickles by name."""
    return _rebuild_linear_subclass, (self._lowbit_base,), self.__getstate__()


def _rebuild_linear_subclass(base: type) -> nn.Module:
    """An empty instance of the quantized class of ``base`` (its state is set after)."""
    return object.__new__(linear_subclass_class(base))


def quant_class_for(module: nn.Module):
    """The quantized class for ``module``'s class, or None when it is not supported."""
    if isinstance(module, QuantMixin):
        return None
    if type(module) is nn.Linear:
        return QuantLinear
    if isinstance(module, nn.Linear):
        return linear_subclass_class(type(module))
    if isinstance(module, nn.MultiheadAttention):
        from lowbit.nn.mha import QuantMultiheadAttention

        return QuantMultiheadAttention if QuantMultiheadAttention.unsupported(module) is None \
            else None
    if type(module) is nn.Conv1d:
        return QuantConv1d
    if type(module) is nn.Conv2d:
        return QuantConv2d
    gpt2 = _GPT2
    if gpt2 is not None and type(module) is gpt2[0]:
        return gpt2[1]
    return None


_GPT2 = _gpt2_conv1d_class()


def quantize_module(module: nn.Module, weight: QuantSpec | None = None,
                    input: QuantSpec | None = None, output: QuantSpec | None = None,
                    name: str = "") -> nn.Module:
    """Make ``module`` quantized in place (class swap + quantizers); returns it."""
    cls = quant_class_for(module)
    if cls is None:
        raise TypeError(f"{name or type(module).__name__}: {type(module).__name__} cannot be "
                        "quantized (Linear and its subclasses that keep Linear's forward, Conv1d, "
                        "Conv2d, GPT-2 Conv1D and nn.MultiheadAttention can)")
    module.__class__ = cls
    module._init_quantizers(weight, input, output, name)
    return module
