"""OPT (pre-norm variants, ``do_layer_norm_before``: every size but 350m):
``self_attn_layer_norm -> q/k/v``, ``final_layer_norm -> fc1`` (LayerNorms: ``w``, with a
bias), ``v_proj -> out_proj``.
``fc2`` follows a ReLU: no pair."""

from lowbit.adapters.base import Adapter, register_adapter

OPT = register_adapter(Adapter(
    name="opt",
    model_types=("opt",),
    blocks=("model.decoder.layers", "decoder.layers"),
    groups=(("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",))),
    pairs=(("self_attn.v_proj", "self_attn.out_proj"),),
    accepts=lambda model: bool(getattr(model.config, "do_layer_norm_before", True)),
    norm="w",
))
