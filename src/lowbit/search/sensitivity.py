"""Per-layer sensitivity: how much the loss grows when one layer alone is quantized.

For every quantizable linear layer (those the candidate recipes quantize: by default every
``nn.Linear`` but the LM head) and every candidate format, the increase of the mean
next-token loss (nats per token) on the calibration batches when only that layer is
quantized with that candidate.

Two methods:

* ``"measured"``: the loss with that layer quantized minus the loss without, one full pass
  over the calibration batches per (layer, candidate): exact for the data, slow
  (``layers x candidates`` passes).
* ``"fisher"`` (default): one forward/backward pass per group of candidates. For each layer
  the inputs ``x_t`` and the gradients ``g_t = dL/dy_t`` of the summed loss with respect to
  its outputs are kept for a sample of tokens; the output error of the quantized layer
  ``dy_t = layer_q(x_t) - layer(x_t)`` (weight and activation quantization, algorithm steps
  included) gives the empirical-Fisher estimate

      dL ~= 1/2 * mean_t (g_t . dy_t)^2      (nats per token)

  the second-order term of the Taylor expansion with the Hessian replaced by the Fisher
  ``sum_t grad l_t grad l_t^T``. The first-order term ``mean_t g_t . dy_t`` and the diagonal
  form ``1/2 mean_t sum_i (g_ti dy_ti)^2`` are kept in ``estimates`` for comparison.
  ``check=`` measures a few layers as well and reports the rank correlation.

Losses: the causal-LM loss of the token ids the forward loop feeds (``labels`` when given,
positions with ``attention_mask == 0`` ignored), from ``output.logits`` ``[b, L, vocab]``.

Mixture-of-experts models: the stacked experts are first split per expert in place
(:func:`lowbit.adapters.experts.unfuse_experts`, same function, as :func:`lowbit.quantize`
does). An expert's linear sees only the tokens routed to it; its rows are mapped back to
token positions, so the estimate counts exactly the sampled tokens that reach it. The
searched unit is chosen by ``experts=``:

* ``"group"`` (default): all experts of one block's projection are one unit
  (``model.layers.3.mlp.experts.*.down_proj``): its loss is the Fisher estimate of their
  joint output error (per token, the sum over the experts it is routed to), its bits the
  sum. Default because MoE engines (vLLM's fused-MoE kernels, llama.cpp's ``*_exps``
  tensors) run one format for all experts of a layer, because a single expert sees
  ``top_k / E`` of the tokens (64 experts, top-4: 1/16), too few for a stable estimate,
  and because it keeps the search the size of a dense model's (3 units per MoE block, not
  ``3 x E``; the ``measured`` method would otherwise need one pass per expert projection);
* ``"each"``: every expert projection is its own unit.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.adapters.base import is_linear
from lowbit.config.recipe import Recipe, match
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.modules import quant_class_for
from lowbit.pipeline.capture import _patched_forward
from lowbit.search.candidates import Candidate, Prepared, parse_candidates, prepare
from lowbit.search.moe import EXPERT_MODES, expert_map, unit_switches, units_of

METHODS = ("fisher", "measured")


@dataclass
class Sensitivity:
    """Per-layer, per-candidate loss increases and weight sizes.

    ``loss[layer][cand]``: predicted (``fisher``) or measured loss increase, nats/token;
    ``bits[layer][cand]``: bits the layer's weight takes in that format (codes, scales,
    zero-points, as :mod:`lowbit.eval.footprint` counts them); ``numel[layer]``: its weight
    count. A candidate that does not quantize a layer has no entry for it. ``base_loss``:
    the unquantized model's mean loss (nats/token); ``tokens``: tokens scored in the Fisher
    pass, ``sampled``: of which kept for the estimate; ``measured``/``curvature``: the
    measured check (``measured`` method: every layer), ``estimates``: the first-order and
    diagonal variants of the estimate.
    """

    layers: list[str]
    numel: dict[str, int]
    candidates: list[str]
    loss: dict[str, dict[str, float]]
    bits: dict[str, dict[str, int]]
    method: str
    base_loss: float
    tokens: int
    recipes: dict[str, Recipe | None] = field(default_factory=dict)
    sampled: int = 0
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    curvature: dict[str, dict[str, float]] = field(default_factory=dict)
    estimates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    groups: dict[str, list[str]] = field(default_factory=dict)

    def members(self, unit: str) -> list[str]:
        """The module names of searched unit ``unit`` (a group of MoE experts' projections,
        ``experts="group"``, or the module itself)."""
        return self.groups.get(unit, [unit])

    def rank_correlation(self, estimate: str | None = None,
                         against: str = "measured") -> float | None:
        """Spearman correlation between the estimate (``loss``, or ``estimates[estimate]``)
        and the measured loss increases (``against="measured"``) or measured curvature terms
        (``"curvature"``) over the measured (layer, quantized candidate) pairs; None when
        fewer than 3 pairs."""
        est = self.loss if estimate is None else self.estimates[estimate]
        ref = {"measured": self.measured, "curvature": self.curvature}[against]
        a, b = [], []
        for layer, row in ref.items():
            for cand, v in row.items():
                if self.recipes.get(cand) is not None and cand in est.get(layer, {}):
                    a.append(est[layer][cand])
                    b.append(v)
        return spearman(a, b) if len(a) >= 3 else None

    def to_dict(self) -> dict:
        """JSON-ready dict (recipes as their dicts) that :meth:`from_dict` reads back."""
        return {"layers": self.layers, "numel": self.numel, "candidates": self.candidates,
                "loss": self.loss, "bits": self.bits, "method": self.method,
                "base_loss": self.base_loss, "tokens": self.tokens, "sampled": self.sampled,
                "recipes": {k: None if r is None else r.to_dict()
                            for k, r in self.recipes.items()},
                "measured": self.measured, "curvature": self.curvature,
                "estimates": self.estimates,
                "seconds": self.seconds, "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["recipes"] = {k: None if r is None else Recipe.parse(r, f"sensitivity recipe {k}")
                        for k, r in d.get("recipes", {}).items()}
        return cls(**d)

    def save(self, path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Sensitivity":
        """Read a file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get average ranks)."""
    if len(a) != len(b) or len(a) < 2:
        raise ConfigError(f"spearman: need two sequences of one length >= 2, got {len(a)} "
                          f"and {len(b)}")

    def ranks(x):
        t = torch.as_tensor(list(x), dtype=torch.float64)
        order = torch.argsort(t, stable=True)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for v in torch.unique(t):  # average ranks of ties
            m = t == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


# --- the loss probe -----------------------------------------------------------------------
_patched = _patched_forward  # the pipeline's: swap model.forward for a while


class _Probe:
    """Runs ``forward_loop`` on a model and sums its causal-LM loss (optionally backward)."""

    def __init__(self, tokens_per_call: int = 0, seed: int = 0):
        self.tokens_per_call = tokens_per_call
        self.gen = torch.Generator().manual_seed(seed)
        self.total = 0.0
        self.count = 0
        self.idx: torch.Tensor | None = None
        self.base = 0                            # sampled tokens of the calls before
        self.weights: list[torch.Tensor] = []   # per call: weight of each sampled token

    def run(self, model: nn.Module, forward_loop: Callable, backward: bool) -> float:
        orig = model.forward

        def forward(*args, **kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
                raise CalibrationError("sensitivity needs token ids [batch, seq] as the "
                                       "model's first argument or input_ids=")
            labels = kwargs.get("labels", ids)[:, 1:].clone()
            mask = kwargs.get("attention_mask")
            if mask is not None:
                labels[mask[:, 1:] == 0] = -100
            n_pos = ids.numel()
            if backward:
                k = min(self.tokens_per_call or n_pos, n_pos)
                self.base = sum(int(w.numel()) for w in self.weights)
                self.idx = torch.randperm(n_pos, generator=self.gen)[:k].sort().values
                self.weights.append(torch.full((k,), n_pos / k, dtype=torch.float64))
            with torch.set_grad_enabled(backward):
                out = orig(*args, **kwargs)
                logits = getattr(out, "logits", None)
                if logits is None:
                    logits = out[0] if isinstance(out, (tuple, list)) else out
                if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
                    raise CalibrationError("sensitivity needs a causal LM returning logits "
                                           "[batch, seq, vocab]")
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                      labels.reshape(-1).to(logits.device), reduction="sum",
                                      ignore_index=-100)
                self.total += float(nll.detach())
                self.count += int((labels != -100).sum())
                if backward:
                    nll.backward()
            return out

        with _patched(model, forward):
            if backward:
                forward_loop(model)
            else:
                with torch.no_grad():
                    forward_loop(model)
        if self.count == 0:
            raise CalibrationError("the forward loop scored no token (no call, or every "
                                   "label masked)")
        return self.total / self.count


def mean_loss(model: nn.Module, forward_loop: Callable) -> float:
    """Mean next-token loss (nats/token) of ``model`` over the batches of ``forward_loop``."""
    return _Probe().run(model, forward_loop, backward=False)


@contextmanager
def _no_param_grads(models: Sequence[nn.Module]):
    params = {id(p): p for m in models for p in m.parameters()}
    saved = {k: p.requires_grad for k, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for k, p in params.items():
            p.requires_grad_(saved[k])


def _collect(model: nn.Module, names: list[str], forward_loop: Callable, seed: int,
             tokens_per_call: int, dtype: torch.dtype):
    """One forward/backward pass: per layer, sampled inputs ``[T, in]``, output gradients
    ``[T, out]`` and the sampled-token index of each row ``[T]`` (a routed expert's linear
    has a row for each sampled token routed to it); returns ``(xs, gs, positions, token
    weights [T_all], n_scored, mean loss)``."""
    probe = _Probe(tokens_per_call, seed)
    mods = dict(model.named_modules())
    xs: dict[str, list] = {n: [] for n in names}
    gs: dict[str, list] = {n: [] for n in names}
    ps: dict[str, list] = {n: [] for n in names}
    experts = expert_map(model, names)
    routing: dict[int, torch.Tensor] = {}  # id(MoEExperts) -> top_k_index of this call

    def route_hook(mod, args, kwargs):
        idx = args[1] if len(args) > 1 else kwargs.get("top_k_index",
                                                        kwargs.get("router_indices"))
        routing[id(mod)] = idx.detach()

    def rows_of(name: str, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of this call's input to keep, their sampled-token indices)."""
        idx = probe.idx
        if name not in experts:
            return idx, probe.base + torch.arange(idx.numel())
        mod, e = experts[name]
        tok = torch.where(routing[id(mod)].cpu() == e)[0]
        if tok.numel() != n_rows:
            raise CalibrationError(f"layer {name}: {n_rows} rows but {tok.numel()} tokens "
                                   "routed to its expert")
        keep = torch.isin(tok, idx)
        return keep.nonzero().flatten(), probe.base + torch.searchsorted(idx, tok[keep])

    def fwd_hook(name):
        def hook(mod, args, out):
            if not torch.is_grad_enabled():
                return None
            x = args[0].reshape(-1, args[0].shape[-1])
            rows, pos = rows_of(name, x.shape[0])
            rows = rows.to(x.device)
            xs[name].append(x[rows].detach().to(dtype))
            ps[name].append(pos)
            y = out if out.requires_grad else out.detach().requires_grad_()

            def keep(g):
                gs[name].append(g.reshape(-1, g.shape[-1])[rows].detach().to(dtype))

            y.register_hook(keep)
            return y
        return hook

    hooks = [mods[n].register_forward_hook(fwd_hook(n)) for n in names]
    hooks += [m.register_forward_pre_hook(route_hook, with_kwargs=True)
              for m in {id(m): m for m, _ in experts.values()}.values()]
    try:
        with _no_param_grads([model]):
            loss = probe.run(model, forward_loop, backward=True)
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        if len(xs[n]) != len(gs[n]) or (not xs[n] and n not in experts):
            raise CalibrationError(f"layer {n}: saw {len(xs[n])} inputs but {len(gs[n])} "
                                   "gradients (called twice per step, or never)")
    return xs, gs, ps, torch.cat(probe.weights), probe.count, loss


def _estimate(members: list[tuple[nn.Module, list[tuple[str, Any]], torch.Tensor,
                                    torch.Tensor, torch.Tensor]],
              w: torch.Tensor, n: int) -> dict[str, dict[str, float]]:
    """Fisher, first-order and diagonal estimates for one unit, one entry per candidate.

    ``members``: per module of the unit ``(reference module, [(candidate, switch)], x [T,
    in], g [T, out], sampled-token index of each row [T])``; the output errors of the
    members reaching one token add up before they are squared (a dense layer is a unit of
    one module with a row per sampled token)."""
    s_tok: dict[str, torch.Tensor] = {}
    diag: dict[str, float] = {}
    with torch.no_grad():
        for ref, switches, x, g, pos in members:
            if x is None or not x.shape[0]:  # an expert no sampled token reached
                continue
            y0 = ref(x).float()
            for cand, sw in switches:
                sw.on()
                try:
                    d = sw.module(x).float() - y0
                finally:
                    sw.off()
                gd = (g * d).double()
                acc = s_tok.setdefault(cand, torch.zeros(w.numel(), dtype=torch.float64))
                acc.index_add_(0, pos.to(acc.device), gd.sum(-1).cpu())
                diag[cand] = diag.get(cand, 0.0) + float(
                    0.5 * (w[pos] * gd.square().sum(-1).cpu()).sum() / n)
        cands = {c for _, sws, *_ in members for c, _ in sws}
        out = {}
        for cand in sorted(cands):
            s = s_tok.get(cand, torch.zeros(w.numel(), dtype=torch.float64))
            out[cand] = {"fisher": float(0.5 * (w * s * s).sum() / n),
                         "first_order": float((w * s).sum() / n),
                         "diag": diag.get(cand, 0.0)}
    return out


def _measure(p: Prepared, switches: dict, names: list[str], loop: Callable, base: float,
             antithetic: bool, sens: Sensitivity, say: Callable[[str], None]) -> None:
    """Measured loss increase (and curvature term) of each of ``names`` (units) quantized
    alone; ``switches``: the units' switches in ``p``."""
    cand = p.candidate.name
    for n in names:
        if n not in switches:
            continue
        say(f"measuring {n} with {cand}")
        sw = switches[n]
        sw.on()
        try:
            d = mean_loss(p.model, loop) - base
        finally:
            sw.off()
        sens.measured[n][cand] = d
        if sens.method == "measured":
            sens.loss[n][cand] = d
        if antithetic and sw.weight_only:
            with sw.mirrored():
                d_neg = mean_loss(p.model, loop) - base
            sens.curvature[n][cand] = 0.5 * (d + d_neg)


def searchable_layers(model: nn.Module, cands: list[Candidate]) -> list[str]:
    """Names of the linear layers that at least one candidate recipe quantizes (the LM head
    and embeddings are excluded by the presets), in module order."""
    names = []
    for name, m in model.named_modules():
        if quant_class_for(m) is None or not is_linear(m):
            continue
        for c in cands:
            if c.recipe is None or c.recipe.is_excluded(name):
                continue
            specs, hits = c.recipe.specs_for(name)
            if hits and any(s is not None for s in specs.values()):
                names.append(name)
                break
    return names


def _check_layers(layers: list[str], check) -> list[str]:
    if check is None or check == 0:
        return []
    if isinstance(check, int):
        if check < 0:
            raise ConfigError(f"check must be a count >= 0 or name patterns, got {check}")
        n, k = len(layers), min(check, len(layers))
        # one per slot of n // k layers, shifted by one each time so that the kinds vary
        return [layers[i * n // k + i % (n // k)] for i in range(k)]
    pats = [check] if isinstance(check, str) else list(check)
    out = [n for n in layers if any(match(p, n) for p in pats)]
    if not out:
        raise ConfigError(f"check patterns {pats} match no searched layer")
    return out


def sensitivity(model: nn.Module, candidates: "Sequence[Any] | Mapping[str, Any]",
                forward_loop: Callable[[nn.Module], Any], *, method: str = "fisher",
                group_size: int | None = None, check: "int | Sequence[str] | None" = None,
                check_loop: Callable[[nn.Module], Any] | None = None,
                antithetic: bool | None = None, tokens_per_call: int = 64,
                float_bits: int = 16, seed: int = 0,
                store_dtype: torch.dtype = torch.bfloat16, experts: str = "group",
                progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Loss increase of each quantizable layer quantized alone with each candidate.

    Args:
        model: an unquantized causal LM (not modified, but for stacked MoE experts, which
            are split per expert in place: same function; candidates are applied to
            copies).
        candidates: preset names (``"int4-awq"``, ``"nvfp4-weight-only"``...), YAML paths,
            dicts, Recipes or ``"fp16"``/``"bf16"`` (left unquantized, loss 0, 16 bits per
            weight), or a mapping ``name -> recipe``.
        forward_loop: ``callable(model)`` feeding calibration token ids ``[b, L]`` (e.g.
            :func:`lowbit.data.forward_loop_from_batches`); calibrates the candidates and
            provides the loss.
        method: ``"fisher"`` (estimate from one backward pass per candidate group) or
            ``"measured"`` (one pass per layer and candidate).
        group_size: overrides the group size of grouped integer candidates.
        check: with ``"fisher"``, also measure these layers (a count, spread evenly over the
            model, or name patterns); see :meth:`Sensitivity.rank_correlation`.
        check_loop: the batches of the measured check (default: ``forward_loop``).
        antithetic: also measure each weight-only pair with the quantization error
            mirrored (``W - dW``): half the sum of the two loss changes cancels the
            first-order term, which on a few thousand tokens is mostly sampling noise, and
            leaves the curvature term the Fisher estimate predicts (``curvature``). Default:
            on for the check of ``"fisher"``, off for ``"measured"``.
        tokens_per_call: tokens sampled per forward call for the estimate (0: all).
        float_bits: bits per weight counted for ``fp16``/``bf16`` candidates.
        store_dtype: dtype of the kept inputs and gradients (memory: ``tokens x (in + out)``
            per layer).
        experts: MoE models: ``"group"`` (default: all experts of a block's projection are
            one unit, ``<experts>.*.down_proj``) or ``"each"`` (one unit per expert
            projection); see the module doc for why.
        progress: ``callable(message)``.

    Returns:
        :class:`Sensitivity`; ``loss`` in nats per token, ``bits`` per unit (layer, or group
        of experts: ``Sensitivity.members``) and candidate.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if forward_loop is None:
        raise CalibrationError("sensitivity needs forward_loop (calibration token ids)")
    if float_bits <= 0:
        raise ConfigError(f"float_bits must be positive, got {float_bits}")
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    cands = parse_candidates(candidates, group_size)
    from lowbit.adapters.experts import unfuse_experts

    unfuse_experts(model)  # MoE: one linear per expert projection (same function)
    modules = searchable_layers(model, cands)
    if not modules:
        raise ConfigError("no candidate quantizes any linear layer of the model")
    layers, groups = units_of(model, modules, experts)
    mods = dict(model.named_modules())
    numel = {u: sum(int(mods[m].weight.numel()) for m in groups.get(u, [u])) for u in layers}
    sens = Sensitivity(layers, numel, [c.name for c in cands], {n: {} for n in layers},
                       {n: {} for n in layers}, method, float("nan"), 0,
                       recipes={c.name: c.recipe for c in cands}, groups=groups)
    for c in cands:
        if c.is_float:
            for n in layers:
                sens.loss[n][c.name] = 0.0
                sens.bits[n][c.name] = numel[n] * int(float_bits)
    to_measure = layers if method == "measured" else _check_layers(layers, check)
    anti = (method == "fisher") if antithetic is None else bool(antithetic)
    if to_measure:
        sens.measured = {n: {} for n in to_measure}
        if anti:
            sens.curvature = {n: {} for n in to_measure}
    est_names = ("first_order", "diag")
    if method == "fisher":
        sens.estimates = {k: {n: {} for n in layers} for k in est_names}
    # candidates on the original coordinates share one pass; transforming ones get their own
    shared = [c for c in cands if c.kind in ("plain", "weights")]
    groups = ([shared] if shared else []) + [[c] for c in cands if c.kind == "transform"]
    was_training = model.training
    model.eval()
    try:
        for group in groups:
            preps: list[Prepared] = []
            for c in group:
                say(f"preparing candidate {c.name}")
                preps.append(prepare(model, c, forward_loop))
                preps[-1].model.eval()
            run_model = preps[0].model if preps[0].own_pass else model
            unit_sw = [unit_switches(p, sens) for p in preps]
            for p, usw in zip(preps, unit_sw):
                for n, sw in usw.items():
                    sens.bits[n][p.candidate.name] = sw.bits
            if method == "fisher":
                say(f"fisher pass for {', '.join(c.name for c in group)}")
                xs, gs, ps, w, n_tok, base = _collect(run_model, modules, forward_loop,
                                                      seed, tokens_per_call, store_dtype)
                if math.isnan(sens.base_loss):
                    sens.base_loss, sens.tokens, sens.sampled = base, n_tok, int(w.numel())
                run_mods = dict(run_model.named_modules())
                for n in layers:
                    parts = []
                    for m in sens.members(n):
                        sw = [(p.candidate.name, p.layers[m]) for p in preps if m in p.layers]
                        x, g, pos = xs.pop(m), gs.pop(m), ps.pop(m)
                        if sw and x:
                            parts.append((run_mods[m], sw, torch.cat(x).float(),
                                          torch.cat(g).float(), torch.cat(pos)))
                        elif sw:
                            parts.append((run_mods[m], sw, None, None, None))
                    res = _estimate(parts, w, n_tok) if parts else {}
                    for cand, r in res.items():
                        sens.loss[n][cand] = r["fisher"]
                        for k in est_names:
                            sens.estimates[k][n][cand] = r[k]
            if to_measure:
                loop = check_loop or forward_loop
                base = mean_loss(run_model, loop)
                if method == "measured" and math.isnan(sens.base_loss):
                    sens.base_loss = base
                for p, usw in zip(preps, unit_sw):
                    _measure(p, usw, to_measure, loop, base, anti, sens, say)
            del preps
    finally:
        model.train(was_training)
    for c in cands:
        if c.is_float:
            for table in (sens.measured, sens.curvature):
                for n in table:
                    table[n][c.name] = 0.0
    sens.seconds = time.perf_counter() - t0
    if not math.isfinite(sens.base_loss):
        raise CalibrationError("the calibration loss is not finite")
    return sens
