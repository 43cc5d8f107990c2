"""Memory estimates: weights at each precision (scales included) and the KV cache.

Units: bytes; the tables print GB = 1e9 bytes (the convention of model cards: a 70B model in
FP16 is "140 GB").

* weights: ``params * bits / 8`` for the codes, plus one scale per group (``group_size``
  values share a 16-bit scale for INT4/INT8 weight-only formats; NVFP4 has an 8-bit scale per
  16, MXFP4 an 8-bit scale per 32). Per-tensor/per-channel scales are negligible and shown as 0.
* KV cache: ``2 (K and V) * layers * kv_heads * head_dim * seq_len * batch * bytes``.
* mixture-of-experts configs: ``total`` parameters hold every expert; ``active`` parameters
  are those one token runs through: embeddings and LM head, attention, norms, dense MLPs,
  shared experts, the router and the top-k routed experts of each MoE layer (the convention
  of model cards: Mixtral-8x7B 46.7B total / 12.9B active). Weight memory is given for both:
  resident (all experts) and read per token (active).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lowbit.core.blocks import get_block_format
from lowbit.errors import ConfigError


@dataclass(frozen=True)
class Arch:
    """The sizes of a decoder LM that memory depends on."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int | None = None
    tied: bool = False
    mlp_mats: int = 3  # gate/up/down (Llama); 2 for GPT-2/OPT-style MLPs
    # mixture of experts (experts = 0: dense)
    experts: int = 0              # routed experts per MoE layer
    top_k: int = 0                # routed experts per token
    moe_intermediate: int = 0     # width of one routed expert
    shared_intermediate: int = 0  # total width of the shared experts of an MoE layer
    moe_layers: int = 0           # layers with experts (the others have a dense MLP)
    attn_params: int = 0          # per layer, when not q/k/v/o (DeepSeek's MLA)

    @property
    def hd(self) -> int:
        """Head dimension."""
        return self.head_dim or self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        """Whether the model has routed experts."""
        return self.experts > 0

    def _attn(self) -> int:
        return self.attn_params or \
            self.hidden * self.heads * self.hd * 2 + self.hidden * self.kv_heads * self.hd * 2

    def _linears(self, routed: int) -> int:
        """Linear parameters of all blocks with ``routed`` experts per MoE layer."""
        dense_mlp = self.mlp_mats * self.hidden * self.intermediate
        moe = self.mlp_mats * self.hidden * (routed * self.moe_intermediate +
                                             self.shared_intermediate) + \
            self.hidden * self.experts  # router
        return self.layers * self._attn() + (self.layers - self.moe_layers) * dense_mlp + \
            self.moe_layers * moe

    def params(self) -> int:
        """Parameter count (embeddings, attention, MLP or all experts + routers, norms;
        biases ignored)."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self._linears(self.experts) + 2 * self.hidden * self.layers + self.hidden

    def active_params(self) -> int:
        """Parameters one token runs through: :meth:`params` with each MoE layer's
        ``top_k`` routed experts instead of all (equal to :meth:`params` for dense models)."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self._linears(self.top_k) + 2 * self.hidden * self.layers + self.hidden

    def linear_params(self) -> int:
        """Parameters of the decoder blocks' linear layers (what PTQ usually quantizes;
        routers included)."""
        return self._linears(self.experts)


KNOWN: dict[str, Arch] = {a.name: a for a in [
    Arch("llama-2-7b", 32000, 4096, 32, 32, 32, 11008),
    Arch("llama-2-13b", 32000, 5120, 40, 40, 40, 13824),
    Arch("llama-2-70b", 32000, 8192, 80, 64, 8, 28672),
    Arch("llama-3-8b", 128256, 4096, 32, 32, 8, 14336),
    Arch("llama-3-70b", 128256, 8192, 80, 64, 8, 28672),
    Arch("mistral-7b", 32000, 4096, 32, 32, 8, 14336),
    Arch("qwen2.5-7b", 152064, 3584, 28, 28, 4, 18944),
    Arch("smollm2-135m", 49152, 576, 30, 9, 3, 1536, tied=True),
    Arch("mixtral-8x7b", 32000, 4096, 32, 32, 8, 14336, experts=8, top_k=2,
         moe_intermediate=14336, moe_layers=32),
    Arch("qwen3-30b-a3b", 151936, 2048, 48, 32, 4, 6144, head_dim=128, experts=128, top_k=8,
         moe_intermediate=768, moe_layers=48),
]}

# name -> (bits per value, scale bits, values per scale); scale 0 = per-tensor/channel
PRECISIONS: dict[str, tuple[float, int, int]] = {
    "fp32": (32, 0, 1), "fp16": (16, 0, 1), "bf16": (16, 0, 1), "fp8": (8, 0, 1),
    "int8": (8, 0, 1), "int4": (4, 16, 128), "nvfp4": (4, 8, 16), "mxfp4": (4, 8, 32),
}
for _n in ("nvfp4", "mxfp4"):
    _bf = get_block_format(_n)
    PRECISIONS[_n] = (4, 8, _bf.block_size)
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5, "nvfp4": 0.5625}


def parse_params(text: str) -> int:
    """``"70B"``, ``"7.2b"``, ``"135M"``, ``"1e9"`` -> a parameter count."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--params {text!r}: expected a number like 70B, 7.2B or 135M")
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def arch_from_config(path: "str | Path") -> Arch:
    """Read a transformers ``config.json`` (a file or a model folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{path}: no config.json found (expected a model folder or a "
                          "config.json file)")
    try:
        c = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e.msg})") from None
    c = c.get("text_config", c)
    get = lambda *ks, default=None: next((c[k] for k in ks if k in c), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        raise ConfigError(f"{p}: missing hidden_size/num_hidden_layers/num_attention_heads")
    from lowbit.adapters import facts

    mt = c.get("model_type")
    return Arch(**_moe_fields(c, p, layers, hidden, heads),
        name=c.get("_name_or_path") or c.get("model_type", p.parent.name),
        vocab=get("vocab_size", default=32000), hidden=hidden, layers=layers, heads=heads,
        kv_heads=get("num_key_value_heads", default=heads),
        intermediate=get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden) or
        4 * hidden,
        head_dim=get("head_dim"),
        tied=bool(c.get("tie_word_embeddings", facts.ties_by_default(mt))),
        mlp_mats=facts.mlp_matrices(mt),
    )


def _moe_fields(c: dict, p: Path, layers: int, hidden: int, heads: int) -> dict:
    """The MoE and MLA fields of :class:`Arch` from a transformers config dict (empty for a
    dense model). Keys read: ``num_local_experts`` / ``num_experts`` / ``n_routed_experts``,
    ``num_experts_per_tok``, ``moe_intermediate_size``, ``shared_expert_intermediate_size``
    or ``n_shared_experts``, ``first_k_dense_replace``, ``moe_layer_freq``,
    ``decoder_sparse_step``, ``mlp_only_layers``; MLA: ``kv_lora_rank``, ``q_lora_rank``,
    ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``."""
    out: dict = {}
    if c.get("kv_lora_rank"):
        rope, nope = c.get("qk_rope_head_dim", 0), c.get("qk_nope_head_dim", 0)
        v, kv_r, q_r = c.get("v_head_dim", 0), c["kv_lora_rank"], c.get("q_lora_rank")
        q = hidden * q_r + q_r * heads * (nope + rope) + q_r if q_r else \
            hidden * heads * (nope + rope)
        out["attn_params"] = q + hidden * (kv_r + rope) + kv_r + kv_r * heads * (nope + v) + \
            heads * v * hidden
    experts = next((c[k] for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if c.get(k)), 0)
    if not experts:
        return out
    top_k = c.get("num_experts_per_tok")
    if not top_k:
        raise ConfigError(f"{p}: {experts} experts but no num_experts_per_tok (the routed "
                          "experts per token)")
    width = c.get("moe_intermediate_size") or c.get("intermediate_size")
    if c.get("shared_expert_intermediate_size"):
        shared = c["shared_expert_intermediate_size"]
    else:
        shared = (c.get("n_shared_experts") or 0) * width
    first = c.get("first_k_dense_replace") or 0
    dense_only = set(c.get("mlp_only_layers") or [])
    if c.get("decoder_sparse_step"):  # Qwen-MoE: layer i sparse when (i + 1) % step == 0
        step = c["decoder_sparse_step"]
        sparse = [(i + 1) % step == 0 and i not in dense_only for i in range(layers)]
    else:  # DeepSeek/GLM: dense below first_k_dense_replace, then every moe_layer_freq-th
        freq = c.get("moe_layer_freq") or 1
        sparse = [i >= first and i % freq == 0 for i in range(layers)]
    moe_layers = sum(sparse)
    out.update(experts=experts, top_k=top_k, moe_intermediate=width,
               shared_intermediate=shared, moe_layers=moe_layers)
    return out


def resolve_arch(model: str) -> Arch:
    """A known model name (``lowbit.eval.memory.KNOWN``) or a path to a config."""
    key = model.lower()
    if key in KNOWN:
        return KNOWN[key]
    if Path(model).exists():
        return arch_from_config(model)
    raise ConfigError(f"unknown model {model!r}: give a model folder/config.json or one of "
                      f"{', '.join(KNOWN)}")


def weight_bytes(params: int, precision: str, group_size: int | None = None) -> dict:
    """``{"codes": bytes, "scales": bytes, "total": bytes}`` for ``params`` weights."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of "
                          f"{', '.join(PRECISIONS)}")
    bits, sbits, per = PRECISIONS[precision]
    if precision == "int4" and group_size:
        per = group_size
    codes = params * bits / 8
    scales = params / per * sbits / 8 if sbits else 0.0
    return {"codes": codes, "scales": scales, "total": codes + scales}


def kv_cache_bytes(arch: Arch, seq_len: int, batch: int = 1, kv_format: str = "fp16") -> float:
    """KV-cache bytes: 2 * layers * kv_heads * head_dim * seq_len * batch * bytes/value."""
    if kv_format not in KV_BYTES:
        raise ConfigError(f"unknown KV-cache format {kv_format!r}; expected one of "
                          f"{', '.join(KV_BYTES)}")
    return 2 * arch.layers * arch.kv_heads * arch.hd * seq_len * batch * KV_BYTES[kv_format]


def estimate(params: int, arch: Arch | None = None, seq_len: int = 4096, batch: int = 1,
             kv_format: str = "fp16", group_size: int = 128) -> dict:
    """The full table: weights per precision, and the KV cache when ``arch`` is known."""
    rows = []
    for p in PRECISIONS:
        w = weight_bytes(params, p, group_size)
        rows.append({"precision": p, **w})
    out = {"params": params, "weights": rows, "group_size": group_size}
    if arch is not None and arch.is_moe:
        active = round(params * arch.active_params() / arch.params())  # follows --params
        for r in rows:
            r["active_total"] = weight_bytes(active, r["precision"], group_size)["total"]
        out["moe"] = {"total_params": params, "active_params": active,
                      "experts": arch.experts, "top_k": arch.top_k,
                      "moe_layers": arch.moe_layers,
                      "expert_params": arch.moe_layers * arch.experts * arch.mlp_mats *
                      arch.hidden * arch.moe_intermediate}
    if arch is not None:
        out["kv_cache"] = {"format": kv_format, "seq_len": seq_len, "batch": batch,
                           "bytes": kv_cache_bytes(arch, seq_len, batch, kv_format),
                           "per_token_bytes": kv_cache_bytes(arch, 1, 1, kv_format)}
        out["arch"] = arch.__dict__
    return out
