"""GPT-2: ``ln_1 -> attn.c_attn`` (q, k and v fused in one Conv1D), ``ln_2 -> mlp.c_fc``.

LayerNorms (``w``, with a bias). No linear pair: ``c_attn``'s value columns feed
``attn.c_proj`` but its query and key columns do not, and ``mlp.c_proj`` follows a GELU.
"""

from lowbit.adapters.base import Adapter, register_adapter

GPT2 = register_adapter(Adapter(
    name="gpt2",
    model_types=("gpt2",),
    blocks=("transformer.h", "h"),
    groups=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    norm="w",
))
