"""Mixture-of-experts experts as ordinary linears: the quantizable counterpart of the 3-D
``*Experts`` modules of transformers 5.

transformers 5 stores the routed experts of an MoE block as stacked 3-D parameters
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; some families transposed, with the
gate and up rows interleaved, or with biases). :class:`MoEExperts` holds the same weights as
one small MLP per expert, each made of ``nn.Linear`` modules named as the families' original
checkpoints name them::

    mlp.experts.0.gate_proj   [I, H]      mlp.experts.0.up_proj   [I, H]
    mlp.experts.0.down_proj   [H, I]      ... one per expert

so that every part of lowbit that works on linears (recipes and their patterns such as
``"*.mlp.experts.*.down_proj"``, quantizers, calibrators, GPTQ/AWQ/SmoothQuant, exports,
packed kernels) works on each expert, and each expert's hooks see exactly the tokens routed
to it. The module computes the same function as the module it replaces (same routing, same
gate function, same weighted sum, tested per family).

How a family stores its experts is an :class:`ExpertsLayout`, declared per family in
:mod:`lowbit.adapters.experts` (this module knows no family).

Calibration extras (set by the pipeline, never on in inference):

- ``calibrate_all``: every token also passes through every expert, so that each expert's
  statistics and GPTQ Hessians see the whole calibration set; the block's output still
  uses the model's routing only (the outputs of unrouted tokens are discarded);
- ``track_tokens``: count, per expert, the tokens the router sent to it
  (``routed_tokens``, a CPU ``int64 [E]`` tensor; not in the state dict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowbit.errors import ConfigError

ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """How a family's experts module stores its weights (all stacked over experts, dim 0).

    ``gate_up``: name of the fused gate+up parameter (``[E, 2I, H]``, or ``[E, H, 2I]``
    when ``transposed``), None when the experts have no gate (then ``up`` names the
    ``[E, I, H]`` up parameter). ``down``: the down parameter (``[E, H, I]``, or
    ``[E, I, H]`` when ``transposed``). ``concatenated``: the gate rows come first, then the
    up rows (False: interleaved ``g0, u0, g1, u1, ...``). ``bias``: each parameter has a
    ``<name>_bias`` ``[E, out]``. ``gate_fn``: the name of the module's method that turns
    the fused ``[T, 2I]`` gate/up output into ``[T, I]`` (``"_apply_gate"``), or None: the
    activation ``act_fn`` of the gate times up (``act(g) * u``; without a gate ``act(u)``).
    """

    gate_up: str | None = "gate_up_proj"
    down: str = "down_proj"
    up: str | None = None
    transposed: bool = False
    concatenated: bool = True
    bias: bool = False
    gate_fn: str | None = None

    @property
    def has_gate(self) -> bool:
        """Whether the experts have a gate projection."""
        return self.gate_up is not None

    def param_names(self) -> list[str]:
        """The parameter names of the fused module this layout describes."""
        names = [self.gate_up or self.up, self.down]
        return names + [f"{n}_bias" for n in names] if self.bias else names


def split_gate_up(t: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2I, ...]`` -> gate ``[I, ...]``, up ``[I, ...]``."""
    if concatenated:
        half = t.shape[0] // 2
        return t[:half], t[half:]
    return t[0::2], t[1::2]


def join_gate_up(g: torch.Tensor, u: torch.Tensor, concatenated: bool) -> torch.Tensor:
    """Inverse of :func:`split_gate_up` along dim 0."""
    if concatenated:
        return torch.cat([g, u], 0)
    return torch.stack([g, u], 1).reshape(2 * g.shape[0], *g.shape[1:])


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=t.requires_grad)


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(gate(gate_proj(x), up_proj(x)))``; ``x [T, H] -> [T, H]``.

    ``gate_proj`` is absent when the family has no gate. The gate function is the parent's
    (:meth:`MoEExperts.gate`), so that a family's own (e.g. gpt-oss's clamped SwiGLU) runs.
    """

    def __init__(self, gate: nn.Linear | None, up: nn.Linear, down: nn.Linear):
        super().__init__()
        if gate is not None:
            self.gate_proj = gate
        self.up_proj = up
        self.down_proj = down
        self._gate: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]`` -> ``[T, H]``."""
        g = self.gate_proj(x) if hasattr(self, "gate_proj") else None
        return self.down_proj(self._gate(g, self.up_proj(x)))


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``w [out, in]`` and ``b [out]`` (no init work)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = int(w.shape[1]), int(w.shape[0])
    lin.weight = _param(w)
    lin.bias = _param(b) if b is not None else None
    return lin


def _exporting() -> bool:
    """Whether torch.export / dynamo is tracing (``torch.compiler.is_exporting`` where this
    torch has it)."""
    f = getattr(torch.compiler, "is_exporting", None)
    return bool(f()) if f is not None else torch.compiler.is_compiling()


class MoEExperts(nn.ModuleList):
    """The routed experts of one MoE block as a ``ModuleList`` of :class:`ExpertMLP`.

    Called like the module it replaces: ``forward(hidden_states [T, H], top_k_index
    [T, k] (long), top_k_weights [T, k]) -> [T, H]`` (gpt-oss's keyword names
    ``router_indices`` / ``routing_weights`` are accepted). Built with :meth:`from_fused`;
    :meth:`fused` gives the stacked tensors back in the family's layout.
    """

    def __init__(self, experts: list[ExpertMLP], layout: ExpertsLayout, source: nn.Module,
                 source_class: str):
        super().__init__(experts)
        self.layout = layout
        self.source_class = source_class
        self.num_experts = len(experts)
        # the stripped original module: its gate function and activation (not a submodule)
        self._source = [source]
        self.calibrate_all = False
        self.track_tokens = False
        self.routed_tokens = torch.zeros(len(experts), dtype=torch.int64)
        self.counted = False  # routed_tokens hold a calibration count (set by the pipeline)
        # expert index -> fallbacks taken in calibration (for the report; set by the pipeline)
        self.calib_notes: dict[int, list[str]] = {}
        gate_fn = getattr(source, layout.gate_fn) if layout.gate_fn else None
        act = getattr(source, "act_fn", None)
        if gate_fn is None and act is None:
            raise ConfigError(f"{source_class}: no act_fn and no declared gate function; "
                              "its layout cannot be computed")
        if gate_fn is not None:
            def gate(g, u):
                return gate_fn(join_gate_up(g.t(), u.t(), layout.concatenated).t())
        elif layout.has_gate:
            def gate(g, u):
                return act(g) * u
        else:
            def gate(g, u):
                return act(u)
        for ex in experts:
            ex._gate = gate

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_fused(cls, module: nn.Module, layout: ExpertsLayout,
                   name: str = "experts") -> "MoEExperts":
        """Split ``module``'s stacked parameters per ``layout`` into per-expert linears
        (copies; the fused parameters are then removed from ``module``, so memory is not
        doubled beyond one module). Raises ConfigError when a parameter is missing or its
        shape does not fit the layout."""
        params = dict(module.named_parameters(recurse=False))
        missing = [n for n in layout.param_names() if n not in params]
        if missing:
            raise ConfigError(f"{name} ({type(module).__name__}): parameter(s) {missing} of "
                              f"its declared layout are missing (has {sorted(params)})")
        extra = [n for n in params if n not in layout.param_names()]
        if extra:
            raise ConfigError(f"{name} ({type(module).__name__}): parameter(s) {extra} are "
                              "not in its declared layout; it cannot be split without "
                              "losing them")
        first = layout.gate_up or layout.up
        gu, down = params[first], params[layout.down]
        if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0]:
            raise ConfigError(f"{name}: expected 3-D [E, ...] parameters {first} and "
                              f"{layout.down}, got {list(gu.shape)} and {list(down.shape)}")
        n_exp = int(gu.shape[0])
        experts = []
        with torch.no_grad():
            for e in range(n_exp):
                w = gu[e].t() if layout.transposed else gu[e]          # [2I or I, H]
                d = down[e].t() if layout.transposed else down[e]      # [H, I]
                b = params[f"{first}_bias"][e] if layout.bias else None
                db = params[f"{layout.down}_bias"][e] if layout.bias else None
                if layout.has_gate:
                    if w.shape[0] % 2 or d.shape[1] != w.shape[0] // 2:
                        raise ConfigError(f"{name}: {first} {list(gu.shape)} and "
                                          f"{layout.down} {list(down.shape)} do not fit "
                                          "a fused gate/up layout")
                    wg, wu = split_gate_up(w, layout.concatenated)
                    bg, bu = split_gate_up(b, layout.concatenated) if b is not None \
                        else (None, None)
                    gate = _linear(wg, bg)
                else:
                    wu, bu, gate = w, b, None
                experts.append(ExpertMLP(gate, _linear(wu, bu), _linear(d, db)))
        for n in layout.param_names():
            delattr(module, n)
        return cls(experts, layout, module, type(module).__name__)

    def fused(self) -> dict[str, torch.Tensor]:
        """The stacked parameters in the family's layout (``{name: [E, ...]}``), from the
        current (float) weights of the experts."""
        lay = self.layout
        ups, downs, ubs, dbs = [], [], [], []
        for ex in self:
            u, ub = ex.up_proj.weight, ex.up_proj.bias
            if lay.has_gate:
                u = join_gate_up(ex.gate_proj.weight, u, lay.concatenated)
                if ub is not None:
                    ub = join_gate_up(ex.gate_proj.bias, ub, lay.concatenated)
            d = ex.down_proj.weight
            ups.append(u.t() if lay.transposed else u)
            downs.append(d.t() if lay.transposed else d)
            ubs.append(ub)
            dbs.append(ex.down_proj.bias)
        first = lay.gate_up or lay.up
        out = {first: torch.stack(ups), lay.down: torch.stack(downs)}
        if lay.bias:
            out[f"{first}_bias"] = torch.stack(ubs)
            out[f"{lay.down}_bias"] = torch.stack(dbs)
        return out

    # ------------------------------------------------------------------ forward
    def count(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """Tokens routed to each expert by ``top_k_index [T, k]`` (int64 ``[E]``, on its
        device); added to ``routed_tokens`` when ``track_tokens`` is on."""
        n = self.num_experts
        with torch.no_grad():
            idx = top_k_index.long()
            valid = (idx >= 0) & (idx < n)
            counts = torch.bincount(idx[valid].reshape(-1), minlength=n)[:n]
            if self.track_tokens:
                self.routed_tokens += counts.cpu()
                self.counted = True
        return counts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Weighted sum over each token's top-k experts; ``[T, H] -> [T, H]``."""
        if top_k_index is None:
            top_k_index = kwargs.pop("router_indices")
        if top_k_weights is None:
            top_k_weights = kwargs.pop("routing_weights")
        if kwargs:
            raise TypeError(f"MoEExperts.forward: unexpected arguments {sorted(kwargs)}")
        n = self.num_experts
        out = torch.zeros_like(hidden_states)
        idx = top_k_index.long()
        if _exporting():
            # torch.export (ONNX): no data-dependent branches; every expert runs on every
            # token, weighted by its routing weight (0 where not routed): the same sums in
            # the same order of experts as below
            for e in range(n):
                w = (top_k_weights * (idx == e).to(top_k_weights.dtype)).sum(-1)
                out = out + (self[e](hidden_states) * w[:, None]).to(out.dtype)
            return out
        counts = self.count(idx)
        hit = counts.nonzero().flatten().tolist()
        todo = range(n) if self.calibrate_all else hit
        for e in todo:
            tok, pos = torch.where(idx == e)
            if self.calibrate_all:
                y = self[e](hidden_states)[tok]
            else:
                y = self[e](hidden_states[tok])
            if tok.numel():
                y = y * top_k_weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, source={self.source_class}"


__all__ = ["ExpertMLP", "ExpertsLayout", "MoEExperts", "ROLES", "join_gate_up", "split_gate_up"]
