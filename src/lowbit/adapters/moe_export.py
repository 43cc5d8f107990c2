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
    ``norm_topk``: whether llama.cpp's graph for the architecture renormalises the top-k
    routing weights (hard-coded there, no GGUF key: ``build_moe_ffn(..., norm_w)`` in its
    ``src/models/<arch>.cpp``), to be matched by the config's ``norm_topk_prob`` (None:
    the family has no such field); ``full_kv_heads``: llama.cpp's graph sizes the q/k norms
    by the full width, so it reads only models whose key/value heads equal the query heads
    (OLMoE as released).
    """

    arch: str
    permute_qk: bool = False
    experts_used: str = "num_experts_per_tok"
    expert_ff: str | None = None
    shared_ff: str | None = None
    norm_topk: bool | None = None
    full_kv_heads: bool = False

    def config_mismatch(self, cfg) -> str | None:
        """Why llama.cpp's ``arch`` graph would compute something else than ``cfg`` says, or
        None when it computes the same."""
        if self.norm_topk is not None:
            got = bool(getattr(cfg, "norm_topk_prob", False))
            if got != self.norm_topk:
                return (f"config.norm_topk_prob = {got}, but llama.cpp's {self.arch.lower()} "
                        f"graph {'always' if self.norm_topk else 'never'} renormalises the "
                        f"top-k routing weights (no GGUF key says otherwise); expected "
                        f"{self.norm_topk}")
        if self.full_kv_heads:
            kv = getattr(cfg, "num_key_value_heads", None)
            heads = getattr(cfg, "num_attention_heads", None)
            if kv is not None and kv != heads:
                return (f"config.num_key_value_heads = {kv}, but llama.cpp's "
                        f"{self.arch.lower()} graph sizes the q/k norms for "
                        f"num_attention_heads = {heads} key/value heads; expected {heads}")
        return None


#: transformers model_type -> llama.cpp architecture of the MoE families lowbit writes
GGUF_MOE_ARCHS: dict[str, GgufMoeArch] = {
    "mixtral": GgufMoeArch("LLAMA", permute_qk=True),
    "qwen2_moe": GgufMoeArch("QWEN2MOE", expert_ff="moe_intermediate_size",
                             shared_ff="shared_expert_intermediate_size", norm_topk=False),
    "qwen3_moe": GgufMoeArch("QWEN3MOE", expert_ff="moe_intermediate_size", norm_topk=True),
    "olmoe": GgufMoeArch("OLMOE", norm_topk=False, full_kv_heads=True),
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
