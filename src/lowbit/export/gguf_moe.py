"""The mixture-of-experts part of the GGUF export: stacked expert tensors and their metadata.

llama.cpp stores the routed experts of block ``N`` as three 3-D tensors,
``blk.N.ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``, each the per-expert weights
``[out, in]`` stacked over the experts (numpy ``[E, out, in]``, ggml ``ne = {in, out, E}``),
as ``convert_hf_to_gguf.py`` stacks them; the router is ``blk.N.ffn_gate_inp`` (F32, as
that converter forces it). The names come from the ``gguf`` package's ``TensorNameMap``
(its merged-experts entries ``model.layers.{bid}.mlp.experts.gate_proj`` ...).

One stacked tensor has one ggml type, so the experts of a projection must be quantized
alike: all of them with specs that map exactly to one type (an affine int4 expert whose
Q4_1 offset is not a float16 number widens the whole tensor to Q8_0, still exact), or none
(float, ``float_type``); a mix is a ConfigError naming the block. Metadata:
``{arch}.expert_count``, ``{arch}.expert_used_count`` and, where the family's converter
writes them, ``expert_feed_forward_length`` / ``expert_shared_feed_forward_length``
(declared in :data:`lowbit.adapters.moe_export.GGUF_MOE_ARCHS`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from lowbit.adapters.moe_export import GGUF_MOE_ARCHS, GgufMoeArch
from lowbit.errors import ConfigError
from lowbit.export import gguf_requant
from lowbit.export.base import weight_qtensor
from lowbit.export.gguf_types import NotExact, ggml_type_for, to_blocks
from lowbit.export.moe_names import moe_experts
from lowbit.nn.experts import ROLES
from lowbit.nn.modules import QuantMixin
from lowbit.nn.routers import moe_blocks

ROUTER_TENSORS = ("ffn_gate_inp", "ffn_gate_inp_shexp")  # written F32, as llama.cpp does


def moe_arch(model: nn.Module, model_type: str) -> GgufMoeArch | None:
    """The llama.cpp MoE architecture of ``model`` (None for a dense model); ConfigError
    naming the family for an MoE family lowbit does not write as GGUF, or for experts
    still stored fused (3-D)."""
    blocks = moe_blocks(model)
    if not blocks:
        return None
    arch = GGUF_MOE_ARCHS.get(model_type)
    if arch is None:
        raise ConfigError(f"GGUF export: MoE family {model_type!r} is not supported; the MoE "
                          f"families lowbit writes as GGUF are {', '.join(GGUF_MOE_ARCHS)} "
                          "(llama.cpp: llama with experts, qwen2moe, qwen3moe, olmoe)")
    why = arch.config_mismatch(getattr(model, "config", None))
    if why is not None:
        raise ConfigError(f"GGUF export ({model_type}): {why}")
    split = moe_experts(model)
    fused = [f"{b}.{c}" for b, (c, _) in blocks.items() if f"{b}.{c}" not in split]
    if fused:
        raise ConfigError(f"GGUF export: the experts of {fused[0]} are still fused (3-D); "
                          "lowbit.quantize splits them (or call "
                          "lowbit.adapters.experts.unfuse_experts(model) for a float export)")
    return arch


def is_expert_key(key: str, experts: dict) -> bool:
    """Whether state-dict ``key`` belongs to a split experts module (written stacked)."""
    return any(key.startswith(p + ".") for p in experts)


def expert_tensors(model: nn.Module, tmap, float_type: str, allow_requantize: bool,
                   requantize_type: str, encode: Callable, decode: Callable,
                   inexact: list, requantized: list, widened: list) -> list:
    """``[(gguf name, array, ggml type or None)]``: one stacked tensor per experts module
    and projection. ``encode(w, kind, gname)`` / ``decode(arr, qtype)`` are the exporter's
    float/requantize codecs; problems are appended to ``inexact`` / ``requantized`` /
    ``widened`` as the dense layers' are (the caller reports them)."""
    import gguf

    out = []
    for prefix, ex in moe_experts(model).items():
        for role in ROLES:
            mods = [getattr(e, role, None) for e in ex]
            if all(m is None for m in mods):
                continue
            where = f"{prefix}.*.{role}"
            gname = tmap.get_name(f"{prefix}.{role}.weight", try_suffixes=(".weight",))
            if gname is None:
                raise ConfigError(f"GGUF export: no llama.cpp tensor name for the experts "
                                  f"{where}")
            if any(m.bias is not None for m in mods):
                raise ConfigError(f"GGUF export: the experts {where} have biases, which the "
                                  "llama.cpp architectures lowbit writes do not hold")
            quant = [isinstance(m, QuantMixin) and m.weight_quantizer.is_enabled for m in mods]
            if not any(quant):
                w = torch.stack([m.weight.detach().float().cpu() for m in mods])
                out.append((gname, *encode(w, float_type, gname)))
                continue
            if not all(quant):
                raise ConfigError(f"GGUF export: {sum(quant)} of the {len(mods)} experts "
                                  f"{where} are quantized, the others not; {gname} is one "
                                  "tensor with one ggml type: quantize all of them or none")
            qts = [weight_qtensor(m) for m in mods]
            try:
                blocks = [to_blocks(qt) for qt in qts]
                kinds = {k for _, k in blocks}
                if len(kinds) > 1:
                    blocks = [to_blocks(qt, widen=True) for qt in qts]
                    kinds = {k for _, k in blocks}
                if len(kinds) > 1:
                    raise NotExact(f"its experts need different ggml types ({sorted(kinds)})")
                kind = kinds.pop()
                spec_kind = ggml_type_for(qts[0])
                if kind != spec_kind:
                    widened.append((where, spec_kind, kind))
                arr = np.stack([a for a, _ in blocks])
                out.append((gname, arr, getattr(gguf.GGMLQuantizationType, kind)))
            except NotExact as e:
                if not allow_requantize:
                    inexact.append(f"{where} ({qts[0].spec.short()}): {e}")
                    continue
                with torch.no_grad():
                    w = torch.stack([m.weight_2d(m.quantized_weight()).detach().float().cpu()
                                     for m in mods])
                if requantize_type == "nearest":
                    out.append(_nearest_stack(qts, w, gname, where, requantized))
                    continue
                arr, qtype = encode(w, requantize_type, gname)
                diff = decode(arr, qtype).reshape(w.shape) - w
                requantized.append((where, requantize_type.upper(), float(diff.abs().max()),
                                    float(diff.pow(2).mean().sqrt()), None))
                out.append((gname, arr, qtype))
    return out


def _nearest_stack(qts: list, w: torch.Tensor, gname: str, where: str,
                   requantized: list) -> tuple:
    """The experts requantized to the nearest ggml type (one for all: the largest any
    expert needs); appends the report row ``(where, type, max, rms, codes kept)``."""
    import gguf

    rs = [gguf_requant.nearest(qt, x, None, gname) for qt, x in zip(qts, w)]
    kinds = {r.kind for r in rs}
    if len(kinds) > 1:
        kind = max(kinds, key=gguf_requant.bits_per_weight)
        rs = [gguf_requant.nearest(qt, x, None, gname, only=kind) for qt, x in zip(qts, w)]
    kind = rs[0].kind
    requantized.append((where, kind, max(r.max_change for r in rs),
                        float(np.sqrt(np.mean([r.rms_change ** 2 for r in rs]))),
                        None if any(r.codes_kept is None for r in rs) else
                        all(r.codes_kept for r in rs)))
    return gname, np.stack([r.arr for r in rs]), getattr(gguf.GGMLQuantizationType, kind)


def write_moe_hparams(writer, model: nn.Module, cfg, arch: GgufMoeArch) -> None:
    """``{arch}.expert_count``, ``expert_used_count`` and the family's expert feed-forward
    lengths (see :data:`lowbit.adapters.moe_export.GGUF_MOE_ARCHS`)."""
    counts = {len(ex) for ex in moe_experts(model).values()}
    if len(counts) != 1:
        raise ConfigError(f"GGUF export: the MoE blocks hold different numbers of experts "
                          f"({sorted(counts)}); llama.cpp has one expert_count")
    writer.add_expert_count(counts.pop())
    used = getattr(cfg, arch.experts_used, None)
    if not isinstance(used, int):
        raise ConfigError(f"GGUF export: config.{arch.experts_used} (experts per token) is "
                          f"missing or not an integer: {used!r}")
    writer.add_expert_used_count(used)
    if arch.expert_ff is not None:
        writer.add_expert_feed_forward_length(int(getattr(cfg, arch.expert_ff)))
    if arch.shared_ff is not None and getattr(cfg, arch.shared_ff, None):
        writer.add_expert_shared_feed_forward_length(int(getattr(cfg, arch.shared_ff)))


__all__ = ["ROUTER_TENSORS", "expert_tensors", "is_expert_key", "moe_arch",
           "write_moe_hparams"]
