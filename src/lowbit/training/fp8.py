"""FP8 training: linear layers whose three GEMMs run on FP8 inputs with per-tensor scales.

>>> with lowbit.training.fp8_autocast(model):          # doctest: +SKIP
...     loss = model(ids, labels=ids).loss
>>> loss.backward(); opt.step()                         # doctest: +SKIP

:func:`convert_to_fp8` (or entering :func:`fp8_autocast`) turns every ``nn.Linear`` not
excluded by the recipe into an :class:`Fp8Linear` in place (same parameters). Inside
``fp8_autocast`` an Fp8Linear computes, for ``x [..., K]``, ``W [N, K]``:

* forward: ``y = Q_fwd(x) @ Q_fwd(W).T (+ bias)``, ``y`` in ``x``'s dtype;
* backward: ``g = Q_bwd(dL/dy)``; ``dL/dx = g @ Q_fwd(W)``, ``dL/dW = g.T @ Q_fwd(x)`` (from
  the quantized tensors of the forward pass), ``dL/db = sum(dL/dy)`` in high precision;

where ``Q`` quantizes a whole tensor to FP8 (E4M3 forward, E5M2 or E4M3 backward, see
:class:`~lowbit.training.fp8_scaling.Fp8Recipe`) with the scale of its
:class:`~lowbit.training.fp8_scaling.AmaxHistory` (delayed or current scaling). Amax
histories are updated in training mode (gradients enabled) only. Rounding is ``lowbit.core``'s.

GEMMs: on CUDA, with ``torch._scaled_mm`` available and every dimension a multiple of 16,
the FP8 codes are multiplied by the hardware (float32 output); otherwise (always on CPU)
they are emulated: the dequantized tensors (``codes * scale_inv``, float32) are multiplied
in float32. Outside ``fp8_autocast`` an Fp8Linear is an ordinary ``nn.Linear``.

Which of the two ran is recorded as path ``training.fp8_scaled_mm`` in
:func:`lowbit.hardware.hardware_path_report`. If ``torch._scaled_mm`` raises (e.g. a GPU
without FP8 tensor cores), a :class:`~lowbit.hardware.HardwareFallbackWarning` with the error
is issued once and the emulation runs for the rest of the process (out-of-memory errors are
raised, not caught). The ``torch._scaled_mm`` path ran once, on an NVIDIA H200 with torch 2.11 (2026-12-04, its
``gpu`` test); the emulation is what the CPU tests (and CI) check.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config.recipe import match
from lowbit.core import QTensor, dequantize, fake_quant, quantize
from lowbit.errors import ConfigError
from lowbit.hardware import fell_back, not_attempted, took_hardware
from lowbit.training.fp8_scaling import AmaxHistory, Fp8Meta, Fp8Recipe, fp8_spec

PATH = "training.fp8_scaled_mm"  # name in lowbit.hardware.hardware_path_report()
FALLBACK = "the float32 emulation of the FP8 GEMMs for the rest of the process"
_SCALED_MM_BROKEN = False  # set when the device refused torch._scaled_mm once
_SCALED_MM_ERROR: BaseException | None = None  # what it raised


@dataclass
class Fp8Tensor:
    """A tensor in FP8 with one scale: ``value = code * scale_inv``.

    ``codes`` (a ``torch.float8_*`` tensor) is set for the hardware path, ``values`` (the
    dequantized float32 tensor) for the emulation; ``scale_inv`` is float32 ``[]``.
    """

    fmt: str
    scale_inv: torch.Tensor
    codes: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def t(self) -> "Fp8Tensor":
        """The transpose (a view) of a 2-D tensor."""
        return Fp8Tensor(self.fmt, self.scale_inv,
                         None if self.codes is None else self.codes.t(),
                         None if self.values is None else self.values.t())

    def dequantized(self) -> torch.Tensor:
        """float32 values (``lowbit.core.dequantize`` of the codes when needed)."""
        if self.values is not None:
            return self.values
        qt = QTensor(self.codes.view(torch.uint8), self.scale_inv, None, fp8_spec(self.fmt),
                     tuple(self.codes.shape), torch.float32)
        return dequantize(qt, torch.float32)


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max ``|x|`` of a whole tensor as float32 ``[]`` (NaN propagates)."""
    lo, hi = torch.aminmax(x.detach())
    return torch.maximum(hi, -lo).float()


def quantize_fp8(x: torch.Tensor, fmt: str, scale_inv: torch.Tensor,
                 codes: bool = False) -> Fp8Tensor:
    """Quantize ``x`` (any shape, any float dtype) to FP8 format ``fmt`` with
    ``scale_inv`` (float32 ``[]``): ``fp8(x / scale_inv)``, saturating, rounded by
    ``lowbit.core``. ``codes=True`` keeps the ``torch.float8_*`` codes (for
    ``torch._scaled_mm``), else the float32 dequantized values."""
    spec = fp8_spec(fmt)
    if codes:
        qt = quantize(x, spec, scale=scale_inv, check_finite=False)
        dt = getattr(torch, spec.element_format.torch_dtype)
        return Fp8Tensor(fmt, scale_inv, codes=qt.codes.view(dt))
    return Fp8Tensor(fmt, scale_inv,
                     values=fake_quant(x.float(), spec, scale=scale_inv, check_finite=False))


def _on_gpu(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where ``torch._scaled_mm`` runs (CUDA; tests patch this to force
    the hardware path's failure on a CPU)."""
    return t.is_cuda


def _why_not_scaled_mm(a: Fp8Tensor, b: Fp8Tensor) -> str | None:
    """Why ``torch._scaled_mm`` is not tried for ``a @ b`` by design (None: it is tried)."""
    if a.codes is None or b.codes is None:
        return "operands without FP8 codes"
    if not (_on_gpu(a.codes) and _on_gpu(b.codes)):
        return f"operands on {a.codes.device.type}"
    if a.fmt == b.fmt == "fp8_e5m2":
        return "both operands e5m2"
    (m, k), (_, n) = a.codes.shape, b.codes.shape
    if any(d % 16 for d in (m, k, n)):
        return f"GEMM {m}x{k}x{n} not a multiple of 16"
    return None


def _emulating_after_failure() -> None:
    """Count a GEMM emulated because ``torch._scaled_mm`` failed earlier in the process."""
    fell_back(PATH, _SCALED_MM_ERROR, FALLBACK)


def fp8_mm(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    """``a @ b`` for ``a [M, K]``, ``b [K, N]`` in FP8; float32 ``[M, N]``.

    Hardware (``torch._scaled_mm``) when both carry codes on CUDA and the shapes allow,
    else the float32 product of the dequantized tensors. A ``torch._scaled_mm`` that raises
    warns once (:class:`~lowbit.hardware.HardwareFallbackWarning`) and the emulation runs
    from then on; the path taken is recorded as ``training.fp8_scaled_mm`` (not yet run on
    a GPU).
    """
    global _SCALED_MM_BROKEN, _SCALED_MM_ERROR
    why = _why_not_scaled_mm(a, b)
    if why is None and _SCALED_MM_BROKEN:
        _emulating_after_failure()
    elif why is None:
        try:
            out = torch._scaled_mm(a.codes.contiguous(), b.codes.t().contiguous().t(),
                                   scale_a=a.scale_inv.float().reshape(()),
                                   scale_b=b.scale_inv.float().reshape(()),
                                   out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:  # e.g. no FP8 tensor cores
            _SCALED_MM_BROKEN, _SCALED_MM_ERROR = True, e
            fell_back(PATH, e, FALLBACK)
        else:
            took_hardware(PATH)
            return out[0] if isinstance(out, tuple) else out
    elif a.codes is not None and b.codes is not None:  # codes were made for the hardware
        not_attempted(PATH, why)
    return a.dequantized() @ b.dequantized()


def _use_codes(recipe: Fp8Recipe, x: torch.Tensor) -> bool:
    """Whether to quantize to FP8 codes for ``torch._scaled_mm`` (else float32 values for
    the emulation; why not is recorded for :func:`lowbit.hardware.hardware_path_report`)."""
    if not recipe.use_scaled_mm:
        not_attempted(PATH, "use_scaled_mm=False")
    elif not _on_gpu(x):
        not_attempted(PATH, f"inputs on {x.device.type}")
    elif not hasattr(torch, "_scaled_mm"):
        not_attempted(PATH, f"torch {torch.__version__} has no _scaled_mm")
    elif _SCALED_MM_BROKEN:
        _emulating_after_failure()
    else:
        return True
    return False


def _quantize_tracked(x: torch.Tensor, hist: AmaxHistory, fmt: str, scaling: str,
                      update: bool, codes: bool) -> Fp8Tensor:
    amax = tensor_amax(x)
    s = hist.scale_inv_to_use(amax, scaling)
    q = quantize_fp8(x, fmt, s, codes)
    if update:
        hist.record(amax)
    return q


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, meta: Fp8Meta, recipe: Fp8Recipe, update: bool):  # noqa: D102
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        codes = _use_codes(recipe, x)
        fwd = recipe.forward_format
        qx = _quantize_tracked(x2, meta.input, fwd, recipe.scaling, update, codes)
        qw = _quantize_tracked(weight, meta.weight, fwd, recipe.scaling, update, codes)
        y = fp8_mm(qx, qw.t())
        if bias is not None:
            y = y + bias.float()
        ctx.meta, ctx.recipe, ctx.update, ctx.codes = meta, recipe, update, codes
        ctx.shape, ctx.x_dtype, ctx.has_bias = shape, x.dtype, bias is not None
        ctx.fmts = (qx.fmt, qw.fmt)
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(qx.codes if codes else qx.values, qx.scale_inv,
                              qw.codes if codes else qw.values, qw.scale_inv)
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        dx, sx, dw, sw = ctx.saved_tensors
        qx = Fp8Tensor(ctx.fmts[0], sx, dx if ctx.codes else None, None if ctx.codes else dx)
        qw = Fp8Tensor(ctx.fmts[1], sw, dw if ctx.codes else None, None if ctx.codes else dw)
        recipe = ctx.recipe
        g2 = gy.reshape(-1, gy.shape[-1])
        qg = _quantize_tracked(g2, ctx.meta.grad_output, recipe.backward_format,
                               recipe.scaling, ctx.update, ctx.codes)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(qg, qw).to(ctx.x_dtype).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = fp8_mm(qg.t(), qx).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.float().sum(0).to(ctx.w_dtype)
        return grad_x, grad_w, grad_b, None, None, None


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 inside :func:`fp8_autocast` (see the module
    doc); shapes as ``nn.Linear``: ``x [..., in] -> y [..., out]`` in ``x``'s dtype.

    Attributes: ``fp8_meta`` (:class:`~lowbit.training.fp8_scaling.Fp8Meta`, its buffers are
    in ``state_dict``), ``fp8_recipe``, ``fp8_enabled``. Made in place by
    :func:`convert_to_fp8`.
    """

    fp8_enabled: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 linear inside ``fp8_autocast``, the ordinary one outside."""
        if not self.fp8_enabled:
            return F.linear(x, self.weight, self.bias)
        if not x.is_floating_point():
            raise ConfigError(f"Fp8Linear: input must be a float tensor, got {x.dtype}")
        return _Fp8LinearFn.apply(x, self.weight, self.bias, self.fp8_meta, self.fp8_recipe,
                                  self.training and torch.is_grad_enabled())

    def extra_repr(self) -> str:
        r = self.fp8_recipe
        return super().extra_repr() + f", fp8={r.format}/{r.scaling}"


def convert_to_fp8(model: nn.Module, recipe: "Fp8Recipe | dict | None" = None,
                   **overrides) -> list[str]:
    """Turn every ``nn.Linear`` of ``model`` (exactly that class; lowbit's QuantLinear and
    others are left alone) whose name matches no ``recipe.exclude`` pattern into an
    :class:`Fp8Linear`, in place; returns their names. ``overrides`` are recipe fields
    (``amax_history_len=16``...). A model without such layers raises ConfigError."""
    recipe = Fp8Recipe.parse(recipe, **overrides)
    names = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or any(match(p, name) for p in recipe.exclude):
            continue
        m.__class__ = Fp8Linear
        m.fp8_recipe = recipe
        m.fp8_meta = Fp8Meta(recipe).to(m.weight.device)
        m.fp8_enabled = False
        names.append(name)
    if not names and not any(isinstance(m, Fp8Linear) for m in model.modules()):
        raise ConfigError(f"convert_to_fp8: the model has no nn.Linear outside the excluded "
                          f"patterns {recipe.exclude}")
    return names


def convert_from_fp8(model: nn.Module) -> list[str]:
    """Turn every :class:`Fp8Linear` back into an ``nn.Linear`` (scaling state dropped);
    returns their names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            del m.fp8_meta
            m.__dict__.pop("fp8_recipe", None)
            m.__dict__.pop("fp8_enabled", None)
            m.__class__ = nn.Linear
            names.append(name)
    return names


def fp8_layers(model: nn.Module) -> Iterator[tuple[str, Fp8Linear]]:
    """``(name, Fp8Linear)`` pairs of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            yield name, m


@contextmanager
def fp8_autocast(model: nn.Module, recipe: "Fp8Recipe | dict | None" = None,
                 enabled: bool = True, **overrides):
    """Run ``model``'s linear layers in FP8 inside the ``with`` block.

    On entry the model is converted with :func:`convert_to_fp8` (``recipe``, ``overrides``)
    unless it already has Fp8Linear layers (their recipe and amax histories are kept from
    call to call; a ``recipe`` given again must be the same). The backward pass of a forward
    run inside the block may run after it. ``enabled=False`` runs them in high precision.
    Yields the model.
    """
    layers = list(fp8_layers(model))
    if layers and (recipe is not None or overrides):
        r = Fp8Recipe.parse(recipe, **overrides)
        if any(m.fp8_recipe != r for _, m in layers):
            raise ConfigError("fp8_autocast: the model was already converted to FP8 with "
                              "another recipe (convert_from_fp8 first to change it)")
    if not layers:
        convert_to_fp8(model, recipe, **overrides)
        layers = list(fp8_layers(model))
    before = [m.fp8_enabled for _, m in layers]
    try:
        for _, m in layers:
            m.fp8_enabled = enabled
        yield model
    finally:
        for (_, m), b in zip(layers, before):
            m.fp8_enabled = b
