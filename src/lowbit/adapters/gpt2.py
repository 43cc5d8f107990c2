"""GPT-2: ``ln_1 -> attn.c_attn`` (q, k and v fused in one Conv1D, output ``[q | k | v]``,
``n_embd`` each), ``ln_2 -> mlp.c_fc``, and ``attn.c_attn``'s value columns ->
``attn.c_proj`` (one value head per query head: no tying).

LayerNorms (``w``, with a bias). ``mlp.c_proj`` follows a GELU: no pair. A Conv1D stores its
weight ``[in, out]``: a fused part's slice indexes its columns (the fold reads every linear
through an ``[out, in]`` view).
"""

from lowbit.adapters.base import Adapter, Fused, register_adapter


def qkv_sizes(config) -> list[int]:
    """Output features of ``q``, ``k``, ``v`` in ``c_attn``: ``[n_embd] * 3``."""
    return [config.hidden_size] * 3


C_ATTN = Fused("attn.c_attn", ("q", "k", "v"), qkv_sizes)

GPT2 = register_adapter(Adapter(
    name="gpt2",
    model_types=("gpt2",),
    blocks=("transformer.h", "h"),
    groups=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    pairs=(("attn.c_attn:v", "attn.c_proj"),),
    norm="w",
    fused=(C_ATTN,),
    attention="attn",
))
