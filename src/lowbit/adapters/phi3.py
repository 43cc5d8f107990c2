"""Phi-3 (and Phi-4, which shares ``model_type`` ``"phi3"``): fused projections.

One linear computes q, k and v (``self_attn.qkv_proj``, output ``[q | k | v]``, with
grouped-query attention k and v have ``num_key_value_heads * head_dim`` rows each), one
computes gate and up (``mlp.gate_up_proj``, output ``[gate | up]``, ``up * silu(gate)``).
No biases. RMSNorm scaling by ``w``. Rotary embedding may be partial
(``partial_rotary_factor`` in ``config.rope_parameters``; see
:func:`lowbit.adapters.facts.rotary_dim`).

Scale groups: ``input_layernorm -> self_attn.qkv_proj`` (scored on ``self_attn``),
``post_attention_layernorm -> mlp.gate_up_proj`` (scored on ``mlp``). Pairs across the fused
linears: the ``v`` rows of ``qkv_proj -> o_proj`` (scales of query heads sharing a value
head tied, as for ``v_proj -> o_proj``), the ``up`` rows of ``gate_up_proj -> down_proj``
(the gate rows go through SiLU and keep scale 1).

Rotations: the residual stream as Llama's; R2 rotates the ``v`` rows of ``qkv_proj``.

>>> from lowbit.adapters import fused_parts
>>> fused_parts(model, model.model.layers[0], "self_attn.qkv_proj")   # doctest: +SKIP
[('q', slice(0, 3072)), ('k', slice(3072, 4096)), ('v', slice(4096, 5120))]
"""

from lowbit.adapters.base import (Adapter, Fused, RotationFacts, gqa_channel_map,
                                  register_adapter)


def head_dim(config) -> int:
    """Per-head width: ``config.head_dim`` when set, else ``hidden_size //
    num_attention_heads`` (as transformers' Phi3Attention)."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def qkv_sizes(config) -> list[int]:
    """Output rows of ``q``, ``k``, ``v`` in a fused ``qkv_proj``:
    ``[heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]``."""
    hd = head_dim(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return [config.num_attention_heads * hd, kv * hd, kv * hd]


def gate_up_sizes(config) -> list[int]:
    """Output rows of ``gate`` and ``up`` in a fused ``gate_up_proj``: ``[I, I]``."""
    return [config.intermediate_size, config.intermediate_size]


QKV = Fused("self_attn.qkv_proj", ("q", "k", "v"), qkv_sizes)
GATE_UP = Fused("mlp.gate_up_proj", ("gate", "up"), gate_up_sizes)

PHI3 = register_adapter(Adapter(
    name="phi3",
    model_types=("phi3",),
    blocks=("model.layers", "layers"),
    groups=(("input_layernorm", ("self_attn.qkv_proj",)),
            ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    pairs=(("self_attn.qkv_proj:v", "self_attn.o_proj"),
           ("mlp.gate_up_proj:up", "mlp.down_proj")),
    pair_map=gqa_channel_map,
    norm="w",
    fused=(QKV, GATE_UP),
    # rotations: the fused readers rotate on their input side; R2 on the v rows of qkv_proj
    rotation=RotationFacts(v_proj="self_attn.qkv_proj:v"),
))
