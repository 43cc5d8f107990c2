"""Mixture-of-experts facts found by inspection: expert containers and routers.

Routers are **excluded by default**: a router's few outputs choose which experts run, so
a rounding error there changes the computation itself, and it holds a negligible share of
the weights. This module is the one place that says what a router is.

An *MoE block* is a module one of whose direct children is an *experts container*: a child
whose name contains ``expert`` (``shared_expert*`` aside) and which is a ``ModuleList`` /
``ModuleDict`` of at least two modules, or holds 3-D parameters stacked over the experts
(transformers 5's ``*Experts`` modules: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).
Its number of experts ``E`` is the container's length or the parameters' leading size.

A *router* is a module with a 2-D ``weight`` that is a direct child of an MoE block (the
experts container aside) and

- outputs one logit per expert (``weight.shape[0] == E``: Mixtral/Qwen2-MoE ``gate``, a
  ``Linear`` in older transformers, a ``*TopKRouter`` in transformers 5), or
- outputs one value (``Linear(H, 1)``: Qwen2-MoE's ``shared_expert_gate``), or
- is called ``gate`` or ``router``;

or any module with a 2-D ``weight`` inside such a ``gate``/``router`` child
(``router.classifier`` of Switch Transformers).

Override: a recipe target whose pattern matches a router *and names it* (the router's own
name, the last dotted part such as ``gate`` or ``shared_expert_gate``, appears literally in
the pattern, e.g. ``"*shared_expert_gate"`` or ``"*.mlp.gate"``) quantizes it; catch-all
patterns such as ``"*"`` or ``"*.mlp.*"`` do not (see
:meth:`lowbit.config.recipe.Recipe.names_module`). A recipe ``exclude`` pattern still wins.
"""

from __future__ import annotations

import torch
from torch import nn

ROUTER_NAMES = ("gate", "router")
ROUTER_REASON = "router (excluded by default)"


def _direct_params(m: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in m.named_parameters(recurse=False)]


def n_experts_of(container: nn.Module) -> int | None:
    """Number of experts held by ``container`` (a ModuleList/ModuleDict of >= 2 modules, or
    a module with 3-D parameters ``[E, ...]``); None when it is neither."""
    if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
        return len(container) if len(container) >= 2 else None
    three = [p for p in _direct_params(container) if p.dim() == 3]
    return int(three[0].shape[0]) if three else None


def moe_blocks(model: nn.Module) -> dict[str, tuple[str, int]]:
    """``{block name: (experts child name, number of experts)}`` for every MoE block."""
    out = {}
    for name, m in model.named_modules():
        for child_name, child in m.named_children():
            if "expert" not in child_name or child_name.startswith("shared_expert"):
                continue
            e = n_experts_of(child)
            if e is not None:
                out[name] = (child_name, e)
                break
    return out


def _has_2d_weight(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2


def find_routers(model: nn.Module) -> dict[str, str]:
    """``{module name: why}`` for every router of ``model`` (see the module docstring).

    ``why`` is a short phrase: ``"one logit per expert (E=8)"``, ``"one output"`` or
    ``"named gate"``.
    """
    out: dict[str, str] = {}
    for block, (experts, e) in moe_blocks(model).items():
        prefix = f"{block}." if block else ""
        block_m = model.get_submodule(block) if block else model
        for child_name, child in block_m.named_children():
            if child_name == experts:
                continue
            if _has_2d_weight(child):
                rows = int(child.weight.shape[0])
                if rows == e:
                    out[prefix + child_name] = f"one logit per expert (E={e})"
                elif rows == 1:
                    out[prefix + child_name] = "one output (shared-expert gate)"
                elif child_name in ROUTER_NAMES:
                    out[prefix + child_name] = f"named {child_name}"
            if child_name in ROUTER_NAMES:
                for sub_name, sub in child.named_modules():
                    if sub_name and _has_2d_weight(sub):
                        out[f"{prefix}{child_name}.{sub_name}"] = f"inside {child_name}"
    return out


__all__ = ["ROUTER_NAMES", "ROUTER_REASON", "find_routers", "moe_blocks", "n_experts_of"]
