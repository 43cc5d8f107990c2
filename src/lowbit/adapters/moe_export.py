"""What MoE families' exports need to know that transformers' modules do not say.

Declared once here (principle 12), read by :mod:`lowbit.export.moe_names`
(compressed-tensors) and :mod:`lowbit.export.gguf`:

* :data:`GGUF_MOE_ARCHS`: the llama.cpp architecture of each MoE family lowbit writes as
  GGUF, as llama.cpp's ``convert_hf_to_gguf.py`` chooses it (Mixtral is ``llama`` with
  experts), with the config fields its converter writes as the expert metadata;
* :data:`FUSED_ORIGINAL_EXPERTS`: families whose original Hugging Face checkpoints store the
  experts fused (no per-expert tensor names to go back to). The per-expert names of every
  other family come from transformers' own conversion mapping (see
  :mod:`lowbit.export.moe_names`), not from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgufMoeArch:
    """One MoE family as llama.cpp names it.

    ``arch``: the ``gguf.MODEL_ARCH`` member name; ``permute_qk``: llama.cpp's rotary row
    order for q/k (the ``llama`` architecture); ``experts_used``: the config field of the
    number of experts per token; ``expert_ff``: the config field written as
    ``{arch}.expert_feed_forward_length`` (None: the family writes none);
    ``shared_ff``: the one written as ``{arch}.expert_shared_feed_forward_length``.
    """

    arch: str
    permute_qk: bool = False
    experts_used: str = "num_experts_per_tok"
    expert_ff: str | None = None
    shared_ff: str | None = None


#: transformers model_type -> llama.cpp architecture of the MoE families lowbit writes
GGUF_MOE_ARCHS: dict[str, GgufMoeArch] = {
    "mixtral": GgufMoeArch("LLAMA", permute_qk=True),
    "qwen2_moe": GgufMoeArch("QWEN2MOE", expert_ff="moe_intermediate_size",
                             shared_ff="shared_expert_intermediate_size"),
    "qwen3_moe": GgufMoeArch("QWEN3MOE", expert_ff="moe_intermediate_size"),
    "olmoe": GgufMoeArch("OLMOE"),
}

#: model_type -> how its original checkpoints store the experts, for families with no
#: per-expert original. Their compressed-tensors exports use lowbit's per-expert names
#: (``mlp.experts.E.gate_proj/up_proj/down_proj`` with biases), as llm-compressor's
#: linearized gpt-oss does.
FUSED_ORIGINAL_EXPERTS: dict[str, str] = {
    "gpt_oss": "openai/gpt-oss checkpoints store each block's experts fused "
               "(gate_up_proj [E, H, 2I] interleaved, MXFP4 blocks)",
}

__all__ = ["FUSED_ORIGINAL_EXPERTS", "GGUF_MOE_ARCHS", "GgufMoeArch"]
