"""Calibration of mixture-of-experts blocks: every expert reached, tokens counted, fallbacks
stated.

The routed experts of an MoE block (:class:`lowbit.nn.experts.MoEExperts`, one linear MLP
per expert) see, in a calibration pass, only the tokens the router sends them. This module
is what the pipeline does about it:

- :func:`all_experts`: while a calibration or statistics pass runs (activation statistics,
  GPTQ Hessians, AWQ/SmoothQuant inputs, static quantizers), every token also passes
  through every expert (the recipe option ``moe_calibrate_all_experts``, on by default for
  recipes with algorithm steps); the block's output keeps the model's routing. Passes that
  only compute outputs (scale-search losses, fold checks, the next block's inputs) run
  without it;
- :func:`count_routed` / :func:`tracking`: the tokens routed to each expert
  (``MoEExperts.routed_tokens``), counted once per calibration;
- :func:`finish_calibration`: a static input quantizer of an expert that no token reached
  takes the largest amax of the same projection of the other experts of its block (stated
  on the experts module, then in the report) instead of failing;
- :func:`expert_rows` / :func:`expert_lines`: the report's ``experts`` rows ``{block,
  expert, name, routed_tokens, fallback}`` and its lines (min/median/max over experts, the
  experts under the threshold ``moe_min_tokens`` with their fallback).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from lowbit.errors import CalibrationError
from lowbit.nn.experts import MoEExperts
from lowbit.nn.swap import ApplyReport

#: recipe options that :func:`lowbit.quantize` accepts as overrides
MOE_OPTIONS = ("moe_calibrate_all_experts", "moe_min_tokens")
ALL_TOKENS = "statistics from all tokens (moe_calibrate_all_experts)"
GPTQ_RTN = "GPTQ: RTN (too few tokens for a Hessian)"
NAMED_IN_LINE = 4  # under-calibrated experts named in one report line

_EXPERT_LINEAR = re.compile(r"^(?:(.*)\.)?(\d+)\.(gate_proj|up_proj|down_proj)$")


def experts_modules(root: nn.Module) -> dict[str, MoEExperts]:
    """``{name in root: module}`` of every :class:`MoEExperts` under ``root``."""
    return {n: m for n, m in root.named_modules() if isinstance(m, MoEExperts)}


def expert_of(root: nn.Module, linear: str) -> tuple[str, MoEExperts, int] | None:
    """``(experts name, experts module, expert index)`` when ``linear`` (a name in ``root``)
    is a projection of a routed expert, else None."""
    m = _EXPERT_LINEAR.match(linear)
    if m is None or m.group(1) is None:
        return None
    try:
        parent = root.get_submodule(m.group(1))
    except AttributeError:
        return None
    if not isinstance(parent, MoEExperts):
        return None
    return m.group(1), parent, int(m.group(2))


def min_tokens(experts: MoEExperts, option: int | None) -> int:
    """The under-calibration threshold of ``experts``: ``option``, or (None) the input width
    of its experts (hidden size)."""
    if option is not None:
        return int(option)
    return int(experts[0].up_proj.weight.shape[1]) if len(experts) else 0


@contextmanager
def all_experts(root: nn.Module, on: bool = True):
    """Every :class:`MoEExperts` under ``root`` runs every token through every expert
    (``calibrate_all``) while the context is open (when ``on``); off again after."""
    mods = list(experts_modules(root).values()) if on else []
    for m in mods:
        m.calibrate_all = True
    try:
        yield
    finally:
        for m in mods:
            m.calibrate_all = False


@contextmanager
def tracking(root: nn.Module):
    """Count routed tokens per expert (``routed_tokens``, reset first) of every
    :class:`MoEExperts` under ``root`` while the context is open."""
    mods = list(experts_modules(root).values())
    for m in mods:
        m.routed_tokens.zero_()
        m.track_tokens = True
        m.counted = False
    try:
        yield
    finally:
        for m in mods:
            m.track_tokens = False


def count_routed(ctx) -> dict[str, torch.Tensor]:
    """Count the tokens routed to each expert of ``ctx.block`` (a
    :class:`~lowbit.pipeline.blocks.BlockContext`) over all its chunks (and ranks): one
    pass that stops at the experts (only attention and the router run). Sets
    ``routed_tokens`` of each experts module; returns ``{experts name: int64 [E]}``."""
    mods = experts_modules(ctx.block)
    if not mods:
        return {}

    def hook(mod, args, kwargs):
        idx = args[1] if len(args) > 1 else kwargs.get("top_k_index",
                                                        kwargs.get("router_indices"))
        if idx is None:
            raise CalibrationError(f"block {ctx.name}: the MoE experts were called without "
                                   "expert indices; routed tokens cannot be counted")
        mod.count(idx)

    with tracking(ctx.block):
        hs = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods.values()]
        try:
            with ctx.weights_fp():
                ctx.run(until=list(mods.values()))
        finally:
            for h in hs:
                h.remove()
    for m in mods.values():
        if ctx.comm.enabled:
            ctx.comm.sum_(m.routed_tokens)
        m.counted = True
    return {n: m.routed_tokens.clone() for n, m in mods.items()}


def note(experts: MoEExperts, e: int, text: str) -> None:
    """Record a fallback taken for expert ``e`` (shown in the report)."""
    notes = experts.calib_notes.setdefault(e, [])
    if text not in notes:
        notes.append(text)


def _owners(root: nn.Module) -> dict[int, tuple[MoEExperts, int, str, str]]:
    """``id(quantizer) -> (experts, index, projection, quantizer attribute)`` of every
    activation quantizer of a routed expert under ``root``."""
    out = {}
    for mod in experts_modules(root).values():
        for e, ex in enumerate(mod):
            for role, lin in ex.named_children():
                for qrole, q in getattr(lin, "quantizers", lambda: [])():
                    if qrole != "weight":
                        out[id(q)] = (mod, e, role, f"{qrole}_quantizer")
    return out


def finish_calibration(todo: list, root: nn.Module) -> None:
    """``finish_calibration()`` of each quantizer of ``todo``; a static activation quantizer
    of a routed expert whose calibrator saw no token takes the largest amax (and smallest
    amin) of the same quantizer of the other experts of its block, noted on the experts
    module (:func:`note`). Any other quantizer without data raises as before."""
    owners = _owners(root)
    starving = []
    for q in todo:
        cal = q.calibrator
        if q.mode == "calibrating" and cal is not None and id(q) in owners and \
                getattr(cal, "n_batches", 1) == 0:
            starving.append(q)
        else:
            q.finish_calibration()
    for q in starving:
        mod, e, role, attr = owners[id(q)]
        others = [getattr(getattr(mod[j], role), attr) for j in range(len(mod)) if j != e]
        amaxes = [o.amax for o in others if o.amax is not None]
        if not amaxes:
            q.calibrator = None
            q.disable()
            raise CalibrationError(f"quantizer {q.qname or role}: no expert of its MoE block "
                                   "saw a calibration token; its static scale has no source")
        amins = [o.amin for o in others if o.amin is not None]
        q.set_amax(torch.stack(amaxes).amax(0),
                   torch.stack(amins).amin(0) if len(amins) == len(amaxes) else None)
        q.calibrator = None
        q.mode = "quantizing"
        note(mod, e, f"{role} {attr.replace('_quantizer', '')} scale: largest amax of the "
                     "other experts of its block (no token reached it)")


def expert_rows(model: nn.Module, calibrate_all: bool, option: int | None) -> list[dict]:
    """One row per routed expert whose tokens were counted: ``{block, expert, name,
    routed_tokens, min_tokens, fallback}`` (``fallback``: None when the expert saw at least
    ``min_tokens`` routed tokens, else what its statistics came from)."""
    rows = []
    for name, mod in experts_modules(model).items():
        if not mod.counted:
            continue
        block = name.rpartition(".")[0]
        thr = min_tokens(mod, option)
        for e in range(len(mod)):
            n = int(mod.routed_tokens[e])
            fb = None
            if n < thr:
                if calibrate_all:
                    fb = ALL_TOKENS
                else:
                    fb = "; ".join(mod.calib_notes.get(e, [])) or \
                        "statistics from its routed tokens only"
            rows.append({"block": block, "expert": e, "name": f"{name}.{e}",
                         "routed_tokens": n, "min_tokens": thr, "fallback": fb})
    return rows


def expert_lines(rows: list[dict]) -> list[str]:
    """Report lines: routed tokens per expert (min/median/max), and the experts under their
    threshold, named with their fallback (grouped by fallback)."""
    if not rows:
        return []
    n = torch.tensor([r["routed_tokens"] for r in rows], dtype=torch.float64)
    out = [f"MoE experts: routed calibration tokens per expert min {int(n.min())} / median "
           f"{float(n.median()):g} / max {int(n.max())} over {len(rows)} experts "
           "(model.lowbit_report.experts)"]
    by_fb: dict[str, list[dict]] = {}
    for r in rows:
        if r["fallback"] is not None:
            by_fb.setdefault(r["fallback"], []).append(r)
    for fb, rs in by_fb.items():
        shown = ", ".join(f"{r['name']} ({r['routed_tokens']})" for r in rs[:NAMED_IN_LINE])
        more = f" and {len(rs) - NAMED_IN_LINE} more" if len(rs) > NAMED_IN_LINE else ""
        out.append(f"{len(rs)} expert(s) under {rs[0]['min_tokens']} routed tokens: "
                   f"{shown}{more}; fallback: {fb}")
    return out


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(recipe overrides, MoE options)`` of :func:`lowbit.quantize`'s keywords."""
    moe = {k: overrides[k] for k in MOE_OPTIONS if k in overrides}
    return {k: v for k, v in overrides.items() if k not in MOE_OPTIONS}, moe


__all__ = ["ALL_TOKENS", "GPTQ_RTN", "MOE_OPTIONS", "all_experts", "count_routed",
           "expert_lines", "expert_of", "expert_rows", "experts_modules",
           "finish_calibration", "min_tokens", "note", "split_overrides", "tracking"]



@dataclass
class MoEReport(ApplyReport):
    """:class:`~lowbit.nn.swap.ApplyReport` of a model with MoE experts, plus ``experts``:
    one row per routed expert whose calibration tokens were counted (:func:`expert_rows`);
    :meth:`lines` adds :func:`expert_lines`."""

    experts: list[dict] = field(default_factory=list)

    def lines(self) -> list[str]:  # noqa: D102
        return super().lines() + expert_lines(self.experts)


def moe_report(report: ApplyReport) -> MoEReport:
    """``report`` as a :class:`MoEReport` (same fields, no expert rows yet)."""
    return MoEReport(**{f.name: getattr(report, f.name) for f in fields(report)})


__all__ += ["MoEReport", "moe_report"]
