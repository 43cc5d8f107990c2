"""Mixture-of-experts units of the search: expert linears mapped to their experts module,
grouped per block and projection (``experts="group"``) or searched one by one (``"each"``);
see :mod:`lowbit.search.sensitivity` for which is the default and why."""

from __future__ import annotations

from torch import nn

from lowbit.errors import ConfigError
from lowbit.search.candidates import GroupSwitch, Prepared

EXPERT_MODES = ("group", "each")


def expert_map(model: nn.Module, names: list[str]) -> dict[str, tuple[nn.Module, int]]:
    """``{linear name: (MoEExperts module, expert index)}`` for the routed experts' linears
    among ``names`` (named ``<experts>.<E>.<role>``)."""
    from lowbit.nn.experts import MoEExperts

    exps = {en: m for en, m in model.named_modules() if isinstance(m, MoEExperts)}
    out = {}
    for n in names:
        en, _, e = n.rpartition(".")[0].rpartition(".")
        if en in exps and e.isdigit():
            out[n] = (exps[en], int(e))
    return out


def units_of(model: nn.Module, layers: list[str], experts: str = "group"
             ) -> tuple[list[str], dict[str, list[str]]]:
    """The searched units of ``layers`` (module names, in order) and ``{group unit:
    members}``: with ``experts="group"`` the routed experts' linears of one MoE block and
    projection become one unit ``<experts>.*.<role>`` (placed where its first member is);
    with ``"each"`` every layer is its own unit."""
    if experts not in EXPERT_MODES:
        raise ConfigError(f"experts must be one of {', '.join(EXPERT_MODES)}; got {experts!r}")
    if experts == "each":
        return list(layers), {}
    emap = expert_map(model, layers)
    units: list[str] = []
    groups: dict[str, list[str]] = {}
    for n in layers:
        if n not in emap:
            units.append(n)
            continue
        en = n.rpartition(".")[0].rpartition(".")[0]
        u = f"{en}.*.{n.rpartition('.')[2]}"
        if u not in groups:
            groups[u] = []
            units.append(u)
        groups[u].append(n)
    return units, groups


def unit_switches(p: Prepared, sens) -> dict:
    """``{unit: switch}`` of prepared candidate ``p`` for the units of ``sens``: a
    :class:`~lowbit.search.candidates.GroupSwitch` for a group of experts (those of its
    members the candidate quantizes), the layer's own switch otherwise."""
    out: dict = {}
    for u in sens.layers:
        if u in sens.groups:
            sws = [p.layers[m] for m in sens.groups[u] if m in p.layers]
            if sws:
                out[u] = GroupSwitch(sws)
        elif u in p.layers:
            out[u] = p.layers[u]
    return out


__all__ = ["EXPERT_MODES", "expert_map", "unit_switches", "units_of"]
