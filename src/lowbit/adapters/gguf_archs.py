"""What dense families' GGUF exports need to know: llama.cpp's architecture for each family.

Declared once here (principle 12) and read by :mod:`lowbit.export.gguf`; the MoE families'
counterparts are in :mod:`lowbit.adapters.moe_export`. Each entry says what llama.cpp's
``convert_hf_to_gguf.py`` does for the family and what llama.cpp itself hard-codes for the
architecture (so that the exporter can refuse a model llama.cpp would run differently):

* ``llama`` (Llama, Mistral): q/k rows permuted to llama.cpp's rotary layout;
* ``qwen2``/``qwen3``: no permutation (NeoX rotary), q/k norms as they are;
* ``gemma2``/``gemma3``: every RMSNorm computes ``x * (1 + w)`` (the adapter's declared norm
  kind ``"1+w"``, :func:`lowbit.adapters.facts.norm_offset`: not declared again here);
  llama.cpp's converter writes ``w + 1`` and llama.cpp multiplies by it; llama.cpp scales
  the token embeddings by ``sqrt(n_embd)`` itself (the file holds them unscaled, as the
  checkpoint does); the output
  layer is always the token embedding (no ``output.weight``); the attention scale is
  ``1/sqrt(head_dim)`` (``1/sqrt(n_embd/n_head)`` for the 27B models, picked by layer count), so
  ``query_pre_attn_scalar`` must be that number; sliding-window layers follow a fixed pattern
  (gemma2: every 2nd layer starting at 0; gemma3: 5 of every 6) with a fixed local rope base
  (gemma3: 10000); soft-capping: gemma2 attention and final logits, gemma3 final logits only;
* ``gemma3`` multimodal (``Gemma3ForConditionalGeneration``): the text tower is written as the
  ``gemma3`` architecture; llama.cpp reads the vision tower and projector from a separate
  ``mmproj`` file, which lowbit does not write (the export says so in a warning);
* ``olmo2``: no permutation (NeoX rotary), q/k norms over the whole projection, norms after
  attention and MLP (``post_attention_norm``, ``post_ffw_norm``);
* ``granite``: as ``llama`` (q/k rows permuted), plus the four multipliers written as
  ``{arch}.attention.scale``, ``embedding_scale``, ``residual_scale``, ``logit_scale``;
  llama.cpp's converter drops ``head_dim`` (so one other than ``hidden/heads`` is refused);
* ``gpt2``: fused ``c_attn`` -> ``attn_qkv``, ``Conv1D`` weights transposed to ``[out, in]``,
  learned position embeddings ``position_embd``, LayerNorms with biases, no rotary;
* ``phi3`` (Phi-3, Phi-4): fused ``qkv_proj`` -> ``attn_qkv`` and fused ``gate_up_proj`` ->
  ``ffn_up`` (gate half first, as llama.cpp's SwiGLU splits it), written as they are;
  ``sliding_window`` always written (0 when the config has none, which marks Phi-4).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgufArch:
    """One dense family as llama.cpp runs it.

    ``arch``: the ``gguf.MODEL_ARCH`` member name. ``permute_qk``: q/k rows (weights and
    biases) reordered for llama.cpp's rotary layout. (Norms that multiply by ``1 + w`` are
    the adapter's declaration, :func:`lowbit.adapters.facts.norm_offset`; the file stores
    ``w + 1`` for state-dict keys ending ``norm.weight``, the converter's rule.)
    ``embedding_scale_in_engine``: llama.cpp multiplies the token
    embeddings by ``sqrt(hidden_size)`` itself. ``output_is_embedding``: llama.cpp has no
    separate output layer for the architecture (a quantized or untied ``lm_head`` is refused).
    ``softcaps``: config fields written as ``{arch}.<field>`` (GGUFWriter ``add_<field>``;
    one the family's transformers forward ignores, :func:`lowbit.adapters.facts.ignored_config`,
    is refused: the multimodal Gemma-3's ``final_logit_softcapping``);
    ``no_softcaps``: config fields llama.cpp's architecture has no place for (refused when
    set); ``softcaps_required``: llama.cpp applies its defaults (50, 30) when the file has
    none, so a config without them is refused. ``swa_period``: llama.cpp's hard-coded
    sliding-window pattern (layer ``i`` slides when ``i % period < period - 1``);
    ``swa_rope_theta``: its hard-coded rope base of those layers (None: the global one). ``gemma_attn_scale``: llama.cpp's attention scale rule
    (``1/sqrt(head_dim)``, or ``1/sqrt(hidden/heads)`` with ``big_layers`` layers).
    ``sliding_window_always``: write ``{arch}.attention.sliding_window`` as 0 when the config
    has none. ``rope_orig_ctx``: write ``original_max_position_embeddings``.
    ``scales``: ``(config field, GGUFWriter method)`` pairs written when the field is set
    (Granite's multipliers). ``head_dim_from_heads``: llama.cpp derives the head size as
    ``hidden_size / num_attention_heads`` (a config ``head_dim`` that differs is refused).
    ``gpt2_style``: learned positions and LayerNorms, no rotary (GPT-2's hyperparameters).
    ``transposed``: state-dict key suffixes of weights stored ``[in, out]`` (transformers'
    ``Conv1D``), written transposed as llama.cpp's converter does (quantized ones are read
    through their ``[out, in]`` view, so their codes are written as they are).
    ``text_prefix``/``other_towers``: a multimodal class's text-tower state-dict prefix (mapped
    to ``model.``) and the prefixes of the towers llama.cpp keeps in the ``mmproj`` file.
    """

    arch: str
    permute_qk: bool = False
    embedding_scale_in_engine: bool = False
    output_is_embedding: bool = False
    softcaps: tuple[str, ...] = ()
    no_softcaps: tuple[str, ...] = ()
    softcaps_required: bool = False
    swa_period: int | None = None
    swa_rope_theta: float | None = None
    gemma_attn_scale: bool = False
    big_layers: tuple[int, ...] = ()
    sliding_window_always: bool = False
    rope_orig_ctx: bool = False
    scales: tuple[tuple[str, str], ...] = ()
    head_dim_from_heads: bool = False
    gpt2_style: bool = False
    transposed: tuple[str, ...] = ()
    text_prefix: str | None = None
    other_towers: tuple[str, ...] = ()


_GEMMA2 = GgufArch("GEMMA2", embedding_scale_in_engine=True,
                   output_is_embedding=True,
                   softcaps=("attn_logit_softcapping", "final_logit_softcapping"),
                   softcaps_required=True, swa_period=2, gemma_attn_scale=True, big_layers=(46,))
_GEMMA3 = GgufArch("GEMMA3", embedding_scale_in_engine=True,
                   output_is_embedding=True, softcaps=("final_logit_softcapping",),
                   no_softcaps=("attn_logit_softcapping",), swa_period=6,
                   swa_rope_theta=10000.0, gemma_attn_scale=True, big_layers=(62,))

#: transformers model_type -> llama.cpp architecture (convert_hf_to_gguf.py's choices)
GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("LLAMA", permute_qk=True),
    "mistral": GgufArch("LLAMA", permute_qk=True),
    "qwen2": GgufArch("QWEN2"),
    "qwen3": GgufArch("QWEN3"),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA3,
    "gemma3": GgufArch(**{**_GEMMA3.__dict__, "text_prefix": "model.language_model.",
                          "other_towers": ("model.vision_tower.",
                                           "model.multi_modal_projector.")}),
    "phi3": GgufArch("PHI3", sliding_window_always=True, rope_orig_ctx=True),
    "olmo2": GgufArch("OLMO2"),
    "gpt2": GgufArch("GPT2", gpt2_style=True, transposed=(
        "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")),
    "granite": GgufArch("GRANITE", permute_qk=True, head_dim_from_heads=True, scales=(
        ("attention_multiplier", "add_attention_scale"),
        ("embedding_multiplier", "add_embedding_scale"),
        ("residual_multiplier", "add_residual_scale"),
        ("logits_scaling", "add_logit_scale"))),
}

__all__ = ["GGUF_ARCHS", "GgufArch"]
