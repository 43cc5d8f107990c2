"""Per-expert tensor names as the original Hugging Face checkpoints of an MoE family spell them.

lowbit holds each routed expert as ``<block>.experts.E.gate_proj / up_proj / down_proj``
(:class:`lowbit.nn.experts.MoEExperts`). The family's original checkpoints may name them
otherwise (Mixtral: ``model.layers.L.block_sparse_moe.experts.E.w1 / w3 / w2``), and
serving engines (vLLM's per-family loaders) read those names. The names are not declared
in lowbit: they are read from transformers' own conversion mapping, the one
``from_pretrained`` applies to fuse the original checkpoints and ``save_pretrained``
reverts (``transformers.core_model_loading.revert_weight_conversion``):

1. a *probe* state dict is built with the model's fused expert tensors in the family's
   layout (``experts.gate_up_proj [E, 2, 1]`` ...), each element a code naming one
   (expert, projection, weight/bias), and a one-element code for every other key;
2. transformers reverts its conversion on the probe;
3. each output key carries one code, so the mapping lowbit name -> checkpoint name is read
   off it. Tensors of a quantized expert (``weight_packed``, ``weight_scale`` ...) follow the
   name of their module (``.../experts.3.w1.weight_scale``).

A family whose original checkpoints store the experts fused (transformers' revert leaves
them fused) has no per-expert names: if it is declared in
:data:`lowbit.adapters.moe_export.FUSED_ORIGINAL_EXPERTS` (gpt-oss), its experts keep
lowbit's per-expert names (as llm-compressor's linearized gpt-oss) with a warning;
otherwise it is a ConfigError naming the family.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from lowbit.adapters.moe_export import FUSED_ORIGINAL_EXPERTS
from lowbit.errors import ConfigError
from lowbit.nn.experts import ROLES, ExpertsLayout, MoEExperts


@dataclass(frozen=True)
class _Slot:
    """What one probe code stands for: a plain key, or one expert tensor."""

    key: str                    # lowbit key (plain) or lowbit expert tensor name
    expert_module: str | None   # lowbit module of the expert projection, for experts


def moe_experts(model: nn.Module) -> dict[str, MoEExperts]:
    """``{name: module}`` of the model's split experts (:class:`MoEExperts`)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEExperts)}


def _expert_probe(prefix: str, ex: MoEExperts, slots: list[_Slot]) -> dict[str, torch.Tensor]:
    """The fused tensors of ``ex`` in its layout, one code per expert tensor (see the module
    doc); ``slots`` gets what each code stands for."""
    lay: ExpertsLayout = ex.layout

    def code(e: int, role: str, what: str) -> float:
        slots.append(_Slot(f"{prefix}.{e}.{role}.{what}", f"{prefix}.{e}.{role}"))
        return float(len(slots) - 1)

    first = lay.gate_up or lay.up
    ups, downs, ubs, dbs = [], [], [], []
    for e in range(len(ex)):
        if lay.has_gate:
            # one row each: the concatenated (g; u) and interleaved (g0, u0) orders agree
            w = [code(e, "gate_proj", "weight"), code(e, "up_proj", "weight")]
        else:
            w = [code(e, "up_proj", "weight")]
        t = torch.tensor(w, dtype=torch.float64).reshape(len(w), 1)
        ups.append(t.t() if lay.transposed else t)
        downs.append(torch.tensor([[code(e, "down_proj", "weight")]], dtype=torch.float64))
        if lay.bias:
            b = [code(e, "gate_proj", "bias")] if lay.has_gate else []
            ubs.append(torch.tensor(b + [code(e, "up_proj", "bias")], dtype=torch.float64))
            dbs.append(torch.tensor([code(e, "down_proj", "bias")], dtype=torch.float64))
    out = {f"{prefix}.{first}": torch.stack(ups), f"{prefix}.{lay.down}": torch.stack(downs)}
    if lay.bias:
        out[f"{prefix}.{first}_bias"] = torch.stack(ubs)
        out[f"{prefix}.{lay.down}_bias"] = torch.stack(dbs)
    return out


def checkpoint_names(model: nn.Module, keys: Iterable[str], modules: Iterable[str] = ()
                     ) -> tuple[dict[str, str], dict[str, str]]:
    """``({key: checkpoint key}, {module: checkpoint module})`` for the tensor ``keys`` lowbit
    writes (``<module>.<tensor>``) and the module names of a config (targets, ignore).

    Identity for a model without split experts. Raises ConfigError when transformers'
    conversion cannot be reverted name by name, or the family stores its experts fused in
    its original checkpoints and is not declared in
    :data:`lowbit.adapters.moe_export.FUSED_ORIGINAL_EXPERTS`.
    """
    keys, modules = list(keys), list(modules)
    experts = moe_experts(model)
    if not experts:
        return {k: k for k in keys}, {m: m for m in modules}
    from transformers.core_model_loading import revert_weight_conversion

    def owner(k: str) -> str | None:
        for p in experts:
            if k.startswith(p + "."):
                return p
        return None

    slots: list[_Slot] = []
    probe: dict[str, torch.Tensor] = {}
    plain = [k for k in keys if owner(k) is None]
    plain += [f"{m}.weight" for m in modules if owner(m + ".") is None]
    for k in dict.fromkeys(plain):
        slots.append(_Slot(k, None))
        probe[k] = torch.tensor([float(len(slots) - 1)], dtype=torch.float64)
    first_expert = len(slots)
    for p, ex in experts.items():
        probe.update(_expert_probe(p, ex, slots))
    family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    try:
        out = revert_weight_conversion(model, probe)
    except Exception as e:  # noqa: BLE001 - transformers' own error, named
        raise ConfigError(f"{family}: transformers' checkpoint conversion could not be "
                          f"reverted on lowbit's tensor names ({type(e).__name__}: {e})") from None
    key_map: dict[str, str] = {}
    exp_modules: dict[str, str] = {}
    fused: list[str] = []
    for name, t in out.items():
        t = t[0] if isinstance(t, list) else t
        codes = [int(c) for c in t.flatten().tolist()]
        if len(codes) != 1:
            if min(codes) >= first_expert:
                fused.append(name)
                continue
            raise ConfigError(f"{family}: transformers' checkpoint conversion merges "
                              f"{name!r}; lowbit cannot name its parts")
        s = slots[codes[0]]
        if s.expert_module is None:
            key_map[s.key] = name
        else:
            what = s.key.rsplit(".", 1)[1]
            if not name.endswith("." + what):
                raise ConfigError(f"{family}: checkpoint name {name!r} of {s.key} does not "
                                  f"end in .{what}")
            exp_modules[s.expert_module] = name[: -len(what) - 1]
    if fused:
        why = FUSED_ORIGINAL_EXPERTS.get(family)
        if why is None:
            raise ConfigError(f"{family}: its original checkpoints store the experts fused "
                              f"({fused[0]}), so they have no per-expert names engines read; "
                              "declare the family in lowbit.adapters.moe_export."
                              "FUSED_ORIGINAL_EXPERTS to write lowbit's per-expert names")
        warnings.warn(f"{family}: {why}; the experts are written per expert under lowbit's "
                      "names (<block>.experts.E.gate_proj/up_proj/down_proj, as "
                      "llm-compressor's linearized checkpoints); transformers does not reload "
                      "them (see docs/deploy.md)", stacklevel=3)
        for s in slots[first_expert:]:
            exp_modules.setdefault(s.expert_module, s.expert_module)
    missing = [k for k in dict.fromkeys(plain) if k not in key_map]
    if missing:
        raise ConfigError(f"{family}: transformers' checkpoint conversion dropped {missing[0]}")
    for k in keys:
        p = owner(k)
        if p is not None:
            mod, _, what = k.rpartition(".")
            if mod not in exp_modules:
                raise ConfigError(f"{family}: no checkpoint name for expert tensor {k}")
            key_map[k] = f"{exp_modules[mod]}.{what}"
    mod_map = {}
    for m in modules:
        mod_map[m] = exp_modules[m] if owner(m + ".") is not None else \
            key_map[f"{m}.weight"].removesuffix(".weight")
    written = [key_map[k] for k in keys]
    if len(set(written)) != len(written):
        dup = next(n for n in written if written.count(n) > 1)
        raise ConfigError(f"{family}: two tensors get the checkpoint name {dup!r}")
    return {k: key_map[k] for k in keys}, mod_map


def expert_targets(model: nn.Module, targets: list[str], mod_map: dict[str, str]) -> list[str]:
    r"""A config group's ``targets`` (lowbit module names) under checkpoint names, with the
    experts it holds written as one ``re:`` target (Mixtral:
    ``re:^(?:model\.layers\.0\.block_sparse_moe\.experts\.\d+\.(?:w1|w3|w2)|...)$``)
    instead of one name per expert: transformers fuses the experts on load and finds their
    scheme by such a target (``get_experts_scheme``: a ``re:`` target that mentions
    ``experts``); vLLM matches it against each expert's name.

    A group must hold all the experts of a block and projection or none of them (engines
    quantize one MoE layer with one scheme): ConfigError naming the block otherwise."""
    experts = moe_experts(model)
    rest: list[str] = []
    held: dict[str, set[str]] = {}
    for t in targets:
        p = next((p for p in experts if t.startswith(p + ".")), None)
        if p is None:
            rest.append(mod_map.get(t, t))
        else:
            held.setdefault(p, set()).add(t)
    alts = []
    for p, names in held.items():
        ex = experts[p]
        roles = [r for r in ROLES if any(n.endswith("." + r) for n in names)]
        want = {f"{p}.{e}.{r}" for e in range(len(ex)) for r in roles}
        if names != want:
            miss = sorted(want - names)[0]
            raise ConfigError(f"{p}: the experts of one projection are quantized with "
                              f"different schemes ({miss} differs); compressed-tensors engines "
                              "(vLLM, transformers) read one scheme per MoE layer")
        first = [mod_map.get(f"{p}.0.{r}", f"{p}.0.{r}") for r in roles]
        cp = first[0].rsplit(".0.", 1)[0]
        crs = [f.rsplit(".0.", 1)[1] if f.startswith(cp + ".0.") else None for f in first]
        ok = None not in crs and all(
            mod_map.get(f"{p}.{e}.{r}", f"{p}.{e}.{r}") == f"{cp}.{e}.{c}"
            for e in range(len(ex)) for r, c in zip(roles, crs))
        if not ok:  # names that do not follow <prefix>.E.<projection>: listed one by one
            rest += [mod_map.get(n, n) for n in sorted(names)]
            continue
        alts.append(re.escape(cp) + r"\.\d+\.(?:" + "|".join(map(re.escape, crs)) + ")")
    return rest + ([f"re:^(?:{'|'.join(alts)})$"] if alts else [])


__all__ = ["checkpoint_names", "expert_targets", "moe_experts"]
