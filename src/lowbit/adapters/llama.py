"""Llama and the families that share its decoder layer (Mistral, Qwen2/3, Gemma 1-3...).

``input_layernorm -> q/k/v``, ``post_attention_layernorm -> gate/up`` (Gemma 2/3 put a
``pre_feedforward_layernorm`` before the MLP), ``v_proj -> o_proj`` (with grouped-query
attention, the scales of the query heads sharing a value head are tied), ``up_proj ->
down_proj``. Llama's RMSNorm scales by ``w``, Gemma's (1, 2 and 3) by ``1 + w``.

Gemma-3 (``gemma3_text``) has Gemma-2's layer (same adapter), but its attention ignores
``attn_logit_softcapping`` (declared in ``ignores``). The multimodal Gemma-3 class
(``Gemma3ForConditionalGeneration``, ``model_type`` ``"gemma3"``) has the same layer in its
text tower (``model.language_model.layers``); its vision tower and projector are declared
``unreached`` (text calibration never runs them) and its forward applies no soft-cap.

Granite is Llama's layer with multipliers (embedding, residual, attention scale, logits,
declared in ``scalars``): none sits between a group's norm and its linears, or inside
``v -> o`` / ``up -> down``, so the folds stay exact (tests/algorithms/test_fused_folds.py).

Rotations (``rotation``): embeddings, final norm and LM head as Llama's; Gemma-2/3's
sandwich post-norms (``post_attention_layernorm``, ``post_feedforward_layernorm``) keep
their writers unrotated. Granite's and Gemma's scalars multiply whole vectors, so they
commute with any rotation.

OLMo 2 normalises *after* attention and MLP (``post_attention_layernorm`` feeds the residual
stream, not the MLP): no norm can absorb a scale, only the linear pairs.
"""

from lowbit.adapters.base import Adapter, RotationFacts, gqa_channel_map, register_adapter
from lowbit.adapters.facts import gemma_scalars, granite_scalars

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_PAIRS = (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj"))
# the residual stream (rotations): embed_tokens -> blocks (o_proj, down_proj write it) ->
# norm -> lm_head; Gemma-2/3 normalise o_proj's and down_proj's outputs before the add
_ROT = RotationFacts()
_ROT_SANDWICH = RotationFacts(post_norms=(("self_attn.o_proj", "post_attention_layernorm"),
                                          ("mlp.down_proj", "post_feedforward_layernorm")))

LLAMA = register_adapter(Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks=("model.layers", "layers"),
    groups=(("input_layernorm", _ATTN), ("post_attention_layernorm", _MLP)),
    pairs=_PAIRS,
    pair_map=gqa_channel_map,
    norm="w",
    rotation=_ROT,
))

GRANITE = register_adapter(Adapter(
    name="granite",
    model_types=("granite",),
    blocks=("model.layers", "layers"),
    groups=(("input_layernorm", _ATTN), ("post_attention_layernorm", _MLP)),
    pairs=_PAIRS,
    pair_map=gqa_channel_map,
    norm="w",
    scalars=granite_scalars,
    rotation=_ROT,
))

GEMMA = register_adapter(Adapter(
    name="gemma",
    model_types=("gemma",),
    blocks=("model.layers", "layers"),
    groups=(("input_layernorm", _ATTN), ("post_attention_layernorm", _MLP)),
    pairs=_PAIRS,
    pair_map=gqa_channel_map,
    norm="1+w",
    scalars=gemma_scalars,
    rotation=_ROT,
))

GEMMA2 = register_adapter(Adapter(
    name="gemma2",
    model_types=("gemma2", "gemma3_text"),
    blocks=("model.layers", "layers"),
    groups=(("input_layernorm", _ATTN), ("pre_feedforward_layernorm", _MLP)),
    pairs=_PAIRS,
    pair_map=gqa_channel_map,
    norm="1+w",
    scalars=gemma_scalars,
    # transformers' Gemma-3 attention does not apply it
    ignores=(("gemma3_text", "attn_logit_softcapping"),),
    rotation=_ROT_SANDWICH,
))

GEMMA3_MM = register_adapter(Adapter(
    name="gemma3_mm",
    model_types=("gemma3",),
    # Gemma3ForConditionalGeneration (transformers 5): model.language_model is the text tower
    # (Gemma3TextModel); model.vision_tower (SigLIP) and model.multi_modal_projector see no
    # activations when calibration feeds text only (declared in ``unreached``)
    blocks=("model.language_model.layers", "language_model.layers",
            "language_model.model.layers"),
    groups=GEMMA2.groups,
    pairs=_PAIRS,
    pair_map=gqa_channel_map,
    norm="1+w",
    scalars=gemma_scalars,
    text_config="text_config",
    # its forward applies neither soft-cap of the text config
    ignores=((None, "attn_logit_softcapping"), (None, "final_logit_softcapping")),
    unreached=(("model.vision_tower", "vision tower: calibration feeds text only, so it sees "
                "no activations"),
               ("model.multi_modal_projector", "multimodal projector: calibration feeds text "
                "only, so it sees no activations")),
    rotation=RotationFacts(
        post_norms=_ROT_SANDWICH.post_norms,
        # image features enter the residual stream through this [vision, hidden] matrix
        extra_inputs=("model.multi_modal_projector.mm_input_projection_weight",)),
))

OLMO2 = register_adapter(Adapter(
    name="olmo2",
    model_types=("olmo2",),
    blocks=("model.layers", "layers"),
    pairs=_PAIRS,
    pair_map=gqa_channel_map,
    rotation_blocker="its blocks normalise the attention and MLP outputs (post_attention_layernorm, "
    "post_feedforward_layernorm) and no norm precedes the linears; not supported by the "
    "rotate step",
))
