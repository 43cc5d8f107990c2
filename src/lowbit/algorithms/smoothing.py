"""Per-input-channel scaling shared by SmoothQuant and AWQ: folding, and scoring candidates.

``Y = X W^T = (X diag(s)^-1) (W diag(s))^T``: the linears' weight columns are multiplied by
``s`` and the module that produced ``X`` divides its output by ``s`` -- a norm's weight (and
bias), or the output rows of a preceding linear -- so that, before quantization, the block
computes the same function (:func:`fold_scales`).

:class:`GroupProbe` scores a candidate ``s`` without touching the model for good: the group's
linears get ``Q(W diag(s))`` and read ``X diag(s)^-1`` (optionally fake-quantized too), and
the output of a target module (the smallest module holding the group: ``self_attn`` for
q/k/v, ``mlp`` for gate/up, or the linears themselves) is compared with its full-precision
output on sampled inputs.

Whether a norm scales by ``w`` or ``1 + w`` is measured by running it
(:func:`lowbit.adapters.norm_kind`), never guessed; :class:`lowbit.algorithms.foldcheck.FoldCheck`
makes the folds prove that the block's float function is unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.adapters import NORM_KINDS, InputGroup, norm_kind
from lowbit.adapters.base import is_conv1d
from lowbit.core import QuantSpec, fake_quant
from lowbit.errors import ConfigError
from lowbit.nn.mha import linear_input
from lowbit.nn.modules import QuantMixin
from lowbit.nn.utils import disabled


def weight_2d(m: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as a ``[out, in]`` view (a Conv1D's stored ``[in,
    out]`` weight transposed: writing the view writes the weight)."""
    if isinstance(m, QuantMixin):
        return m.weight_2d()
    if is_conv1d(m):
        return m.weight.t()
    return m.weight.reshape(m.weight.shape[0], -1)


def _touch(m: nn.Module) -> None:
    if isinstance(m, QuantMixin):
        q = m.weight_quantizer
        if q.scale is not None:  # fixed scales belong to the old weight
            q.scale = q.zero_point = q.global_scale = None
        m.invalidate_weight_cache()


@torch.no_grad()
def fold_scales(block: nn.Module, group: InputGroup, s: torch.Tensor,
                norm_inputs: tuple[tuple, dict] | None = None) -> None:
    """Scale the group's input channels by ``1/s`` upstream and its weights by ``s``.

    ``s``: ``[in]`` of the group's linears. A norm ``prev`` is run first to tell whether it
    scales by ``w`` or ``1 + w`` (:func:`lowbit.adapters.norm_kind`, on ``norm_inputs``
    ``(args, kwargs)`` when given, else a probe input); a norm that does neither, or that
    contradicts the adapter's declaration (``group.norm``), is a :class:`ConfigError`
    before anything changes. Fixed weight scales of the touched linears (from an earlier
    clip search or GPTQ) are dropped, since they described the old weights. With a
    ``channel_map`` (grouped-query attention, or a part of a fused ``prev``: Phi-3's
    ``qkv_proj`` value rows, ``gate_up_proj`` up rows), ``prev``'s output row
    ``channel_map[j]`` is divided by ``s[j]`` and every row no channel maps to keeps scale 1;
    ``s`` must be equal on tied channels (:meth:`InputGroup.tie`). The group's float
    ``readers`` of a norm ``prev`` (MoE routers, shared-expert gates) get their weight
    columns multiplied by ``s`` too, so that their outputs (the routing) are unchanged. Nothing checks the block's function here:
    see :class:`lowbit.algorithms.foldcheck.FoldCheck`.
    """
    prev = block.get_submodule(group.prev)
    s = s.detach().float().to(weight_2d(block.get_submodule(group.linears[0])).device)
    if group.prev_kind == "norm":
        kind = norm_kind(prev, norm_inputs, name=group.prev)
        if group.norm is not None and group.norm != kind:
            raise ConfigError(f"norm {group.prev} ({type(prev).__name__}) scales by {kind}, "
                              f"but the family's adapter declares {group.norm}")
        off = NORM_KINDS[kind]
        w = prev.weight
        w.copy_(((w.float() + off) / s - off).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    elif group.prev_kind == "linear":
        w2 = weight_2d(prev)
        sp = s
        if group.channel_map is not None:  # one scale per output of prev (tied channels)
            cm = group.channel_map
            if cm.numel() != s.numel() or int(cm.max()) >= w2.shape[0]:
                raise ConfigError(f"group {group.prev} -> {', '.join(group.linears)}: its "
                                  f"channel map ({cm.numel()} channels up to row "
                                  f"{int(cm.max())}) does not fit {group.prev}'s "
                                  f"{w2.shape[0]} outputs and the {s.numel()} scales")
            sp = torch.ones(w2.shape[0], device=s.device).scatter_(
                0, group.channel_map.to(s.device), s)
        w2.copy_((w2.float() / sp[:, None]).to(w2.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / sp).to(prev.bias.dtype))
        _touch(prev)
    else:
        raise ConfigError(f"group {group.linears}: prev_kind must be 'norm' or 'linear', got "
                          f"{group.prev_kind!r}")
    readers = list(getattr(group, "readers", None) or []) if group.prev_kind == "norm" else []
    for name in [*group.linears, *readers]:
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
        def hook(mod, a, k, n=n):
            x = linear_input(mod, a, k, n).detach()
            got[n].append(x.reshape(-1, x.shape[-1]).float())

        hs.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in hs:
            h.remove()
    return got


def weight_spec(m: nn.Module) -> QuantSpec | None:
    """The spec of ``m``'s enabled weight quantizer, else None."""
    q = getattr(m, "weight_quantizer", None)
    return q.spec if q is not None and q.is_enabled else None


def input_spec(m: nn.Module) -> QuantSpec | None:
    """The spec of ``m``'s enabled input quantizer, else None."""
    q = getattr(m, "input_quantizer", None)
    return q.spec if q is not None and q.spec is not None else None


def dynamic_version(spec: QuantSpec) -> QuantSpec:
    """``spec`` with scales computed from each input: how a static activation quantizer
    calibrated with ``max`` on the same data behaves, for scoring candidates."""
    if spec.dynamic:
        return spec
    return spec.model_copy(update={"dynamic": True})


def token_weights(x: torch.Tensor, how: str = "none") -> torch.Tensor:
    """Per-token weights (shape ``x.shape[:-1]``) of a squared error: 1 (``"none"``), or
    ``1 / ||x_t||^2`` (``"norm"``) scaled to mean 1."""
    if how == "none":
        return torch.ones(x.shape[:-1], device=x.device)
    if how != "norm":
        from lowbit.errors import ConfigError

        raise ConfigError(f"token_weight must be 'none' or 'norm', got {how!r}")
    w = 1.0 / x.float().square().sum(-1).clamp_min(1e-12)
    return w / w.mean()


def search_grid(points: list, loss: Callable[[object], float], refine: bool = False) -> dict:
    """``{point: loss(point)}`` over the candidate ``points`` (in order along the searched
    axis, e.g. alphas from 0 to 1): every point, or with ``refine`` a coarse pass over every
    ``k``-th point (``k = round(sqrt(n))``, at least 2; the last point included) and then
    every point within ``k - 1`` of the best one -- about ``3 sqrt(n)`` evaluations
    instead of ``n``, the same minimum when the loss has one basin along the axis."""
    if not refine or len(points) < 4:
        return {p: loss(p) for p in points}
    n = len(points)
    k = max(2, round(n ** 0.5))
    idx = list(range(0, n, k))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    got = {i: loss(points[i]) for i in idx}
    b = min(got, key=got.get)
    for i in range(max(0, b - k + 1), min(n, b + k)):
        if i not in got:
            got[i] = loss(points[i])
    return {points[i]: got[i] for i in sorted(got)}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class GroupProbe:
    """Output error of ``group``'s target modules for candidate scales (see the module doc).

    ``inputs``: ``{target name: [(args, kwargs), ...]}`` captured on sampled block inputs.
    ``act_quant``: also fake-quantize the linears' scaled inputs (their input specs made
    dynamic). Every other quantizer inside the targets is off while scoring, so the error is
    the group's own. ``token_weight``: ``"none"`` (plain squared error) or ``"norm"`` (each
    token's error relative to its full-precision output, ``sum_t ||dy_t||^2 / ||y_t||^2``, so
    that a few tokens with massive activations do not decide alone).

    ``reduce``: combines the loss of this process's inputs with the other ranks' (e.g.
    ``ctx.comm.sum_float`` in data-parallel calibration); the per-call errors are summed in
    float64, so the total does not depend on how the calls are split.

    ``max_rows``: only when the targets are the group's own linears, each called on one input
    tensor: a linear with more output rows than this is scored on ``max_rows`` of them,
    evenly spaced and the same for every candidate, its error scaled by ``out / max_rows``
    (an estimate of the full sum). The weight is still quantized whole (so any granularity
    gives the rows their exact quantized values) and only the kept rows are multiplied: the
    scoring matmuls shrink by ``out / max_rows``. None: every row. ``direct``: the same
    targets (the group's own linears on one input tensor each) computed as ``F.linear`` of
    the candidate weight, without writing it into the module and back (implied by
    ``max_rows``; the same values as the module's forward with its quantizers off).
    """

    def __init__(self, block: nn.Module, group: InputGroup, inputs: dict[str, list],
                 act_quant: bool = False, token_weight: str = "none",
                 reduce: Callable[[float], float] | None = None, max_rows: int | None = None,
                 direct: bool = False):
        self.block = block
        self.reduce = reduce
        self.group = group
        self.inputs = inputs
        self.mods = [block.get_submodule(n) for n in group.linears]
        self.act_specs = [dynamic_version(input_spec(m)) if act_quant and input_spec(m)
                          is not None else None for m in self.mods]
        self.wspecs = [weight_spec(m) for m in self.mods]
        self.rows = None
        if max_rows is not None or direct:
            if max_rows is not None and int(max_rows) < 1:
                raise ConfigError(f"max_rows must be a positive number of rows, got {max_rows}")
            if list(inputs) != list(group.linears) or \
                    any(len(a) != 1 or k for calls in inputs.values() for a, k in calls):
                raise ConfigError("max_rows / direct score the group's own linears on one "
                                  "input tensor each; these targets are modules or take more")
            self.rows = []
            for m in self.mods:
                out = weight_2d(m).shape[0]
                idx = None if max_rows is None or out <= max_rows else \
                    torch.linspace(0, out - 1, int(max_rows)).round().long().unique()
                self.rows.append((idx, 1.0 if idx is None else out / idx.numel()))
        with self._all_off():
            self.ref = self._outputs() if self.rows is None else self._row_outputs(None, None)
        self.weights = [token_weights(r, token_weight) for r in self.ref]

    def _all_off(self):
        return disabled(q for name in self.inputs
                        for m in self.block.get_submodule(name).modules()
                        if isinstance(m, QuantMixin) for _, q in m.quantizers())

    @torch.no_grad()
    def _outputs(self) -> list[torch.Tensor]:
        outs = []
        for name, calls in self.inputs.items():
            mod = self.block.get_submodule(name)
            for a, k in calls:
                outs.append(_first(mod(*a, **k)).float())
        return outs

    @torch.no_grad()
    def _row_outputs(self, s: torch.Tensor | None, weights: list[torch.Tensor] | None,
                     quant: bool = False) -> list[torch.Tensor]:
        """The kept rows of each linear's output, computed directly: the (scaled, quantized
        when ``quant``) weight's rows times the (scaled, quantized) input, plus the bias."""
        outs = []
        for i, (m, (idx, _)) in enumerate(zip(self.mods, self.rows)):
            w = weight_2d(m).detach()
            if weights is not None:
                wq = weights[i]
            else:
                wq = w.float() * s[None, :] if s is not None else w.float()
                if quant and self.wspecs[i] is not None:
                    wq = fake_quant(wq, self.wspecs[i])
            wq = wq.to(w.dtype)
            b = getattr(m, "bias", None)
            if idx is not None:
                wq = wq[idx]
                b = None if b is None else b[idx]
            for (x,), _ in self.inputs[self.group.linears[i]]:
                if s is not None or (quant and self.act_specs[i] is not None):
                    x = self._scale_in(x, s, self.act_specs[i] if quant else None)
                outs.append(torch.nn.functional.linear(x.to(wq.dtype), wq, b).float())
        return outs

    def _row_scales(self) -> list[float]:
        return [f for (_, f), calls in zip(self.rows, self.inputs.values()) for _ in calls]

    @torch.no_grad()
    def loss(self, s: torch.Tensor | None, weights: list[torch.Tensor] | None = None) -> float:
        """Squared output error with the group's weights scaled by ``s`` (None: 1) and
        fake-quantized (or replaced by ``weights``, ``[out, in]`` each, already scaled)."""
        if self.rows is not None:
            outs = self._row_outputs(s, weights, quant=True)
            local = sum(f * float(((o - r).square().sum(-1) * w).sum()) for o, r, w, f in
                        zip(outs, self.ref, self.weights, self._row_scales()))
            return float(local) if self.reduce is None else float(self.reduce(float(local)))
        saved = [weight_2d(m).detach().clone() for m in self.mods]
        hooks = []
        try:
            for i, m in enumerate(self.mods):
                if weights is not None:
                    wq = weights[i]
                else:
                    w = saved[i].float() * s[None, :] if s is not None else saved[i].float()
                    wq = fake_quant(w, self.wspecs[i]) if self.wspecs[i] is not None else w
                weight_2d(m).copy_(wq.to(saved[i].dtype))
                if s is not None or self.act_specs[i] is not None:
                    hooks.append(m.register_forward_pre_hook(
                        lambda mod, a, spec=self.act_specs[i]: (self._scale_in(a[0], s, spec),
                                                                *a[1:])))
            with self._all_off():
                outs = self._outputs()
        finally:
            for h in hooks:
                h.remove()
            for m, w in zip(self.mods, saved):
                weight_2d(m).copy_(w)
                m.invalidate_weight_cache()
        local = sum(float(((o - r).square().sum(-1) * w).sum())
                    for o, r, w in zip(outs, self.ref, self.weights))
        return float(local) if self.reduce is None else float(self.reduce(float(local)))

    @staticmethod
    def _scale_in(x: torch.Tensor, s, spec) -> torch.Tensor:
        if s is not None:
            x = x / s.to(x.dtype)
        if spec is not None:
            x = fake_quant(x, spec)
        return x
