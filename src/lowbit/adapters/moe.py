"""Mixture-of-experts families: their groups of linears, pairs and float routers.

Once :func:`lowbit.adapters.experts.unfuse_experts` has split the 3-D experts into one linear
MLP per expert (``mlp.experts.E.gate_proj`` ...), an MoE decoder block offers these folds:

- ``input_layernorm -> q/k/v`` (DeepSeek's multi-head latent attention has no plain q/k/v:
  ``input_layernorm -> q_proj or q_a_proj, kv_a_proj_with_mqa``, ``q_a_layernorm ->
  q_b_proj``, ``kv_a_layernorm -> kv_b_proj``; no ``v -> o`` pair, its value heads come out
  of ``kv_b_proj`` beside the keys);
- ``post_attention_layernorm -> every expert's gate_proj/up_proj`` (and the shared
  expert's, and the dense MLP's in the first dense layers of DeepSeek and GLM-4-MoE). The
  router (and Qwen2-MoE's ``shared_expert_gate``) reads the same normed input and stays
  float: a scale folded into the norm is multiplied into its weight columns, so its logits
  (the routing) do not change (``readers``);
- ``experts.E.up_proj -> experts.E.down_proj`` per expert (and the shared expert's), where
  the gate function is ``act(gate) * up``. Not gpt-oss: its SwiGLU clamps ``up`` and adds
  one to it, so a scale cannot pass through.

Every norm of these families scales by ``w`` (measured anyway when folding).
"""

from __future__ import annotations

from torch import nn

from lowbit.adapters.base import Adapter, gqa_channel_map, register_adapter

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_VO = ("self_attn.v_proj", "self_attn.o_proj")
_DENSE = ("mlp.gate_proj", "mlp.up_proj")
_EXPERTS = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")
_EXPERT_PAIR = ("mlp.experts.*.up_proj", "mlp.experts.*.down_proj")


class MoEAdapter(Adapter):
    """An :class:`~lowbit.adapters.base.Adapter` whose blocks differ (dense first layers,
    MoE ones after): it matches on ``model_type`` and the blocks alone; each block gets the
    declared groups and pairs it holds."""

    def matches(self, model: nn.Module) -> bool:  # noqa: D102
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) not in self.model_types:
            return False
        return self.find_blocks(model) is not None


def _mlp(*shared: str) -> tuple[str, ...]:
    return (*_DENSE, *_EXPERTS, *(f"mlp.{s}.{p}" for s in shared
                                  for p in ("gate_proj", "up_proj")))


def _pairs(*shared: str) -> tuple[tuple[str, str], ...]:
    return (("mlp.up_proj", "mlp.down_proj"), _EXPERT_PAIR,
            *((f"mlp.{s}.up_proj", f"mlp.{s}.down_proj") for s in shared))


def _moe(name: str, model_types: tuple[str, ...], shared: tuple[str, ...] = (),
         readers: tuple[str, ...] = ("mlp.gate",)) -> MoEAdapter:
    """A family with plain q/k/v attention (grouped-query ``v -> o`` pairs)."""
    return register_adapter(MoEAdapter(
        name=name, model_types=model_types, blocks=("model.layers", "layers"),
        groups=(("input_layernorm", _QKV), ("post_attention_layernorm", _mlp(*shared))),
        pairs=(_VO, *_pairs(*shared)), pair_map=gqa_channel_map, norm="w",
        readers=(("post_attention_layernorm", readers),),
    ))


MIXTRAL = _moe("mixtral", ("mixtral",))
QWEN2_MOE = _moe("qwen2_moe", ("qwen2_moe",), shared=("shared_expert",),
                 readers=("mlp.gate", "mlp.shared_expert_gate"))
QWEN3_MOE = _moe("qwen3_moe", ("qwen3_moe",))
OLMOE = _moe("olmoe", ("olmoe",))
GLM4_MOE = _moe("glm4_moe", ("glm4_moe",), shared=("shared_experts",))

GPT_OSS = register_adapter(MoEAdapter(
    name="gpt_oss", model_types=("gpt_oss",), blocks=("model.layers", "layers"),
    groups=(("input_layernorm", _QKV), ("post_attention_layernorm", _EXPERTS)),
    pairs=(_VO,), pair_map=gqa_channel_map, norm="w",
    readers=(("post_attention_layernorm", ("mlp.router",)),),
))

DEEPSEEK = register_adapter(MoEAdapter(
    name="deepseek", model_types=("deepseek_v2", "deepseek_v3"),
    blocks=("model.layers", "layers"),
    groups=(("input_layernorm", ("self_attn.q_proj", "self_attn.q_a_proj",
                                 "self_attn.kv_a_proj_with_mqa")),
            ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
            ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
            ("post_attention_layernorm", _mlp("shared_experts"))),
    pairs=_pairs("shared_experts"), norm="w",
    readers=(("post_attention_layernorm", ("mlp.gate",)),),
))

__all__ = ["DEEPSEEK", "GLM4_MOE", "GPT_OSS", "MIXTRAL", "MoEAdapter", "OLMOE", "QWEN2_MOE",
           "QWEN3_MOE"]
