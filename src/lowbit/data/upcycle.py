"""Sparse upcycling: a Mixtral-style mixture-of-experts built from a dense Llama-like model.

No MoE checkpoint is available offline; :func:`upcycle_moe` builds one from a dense model
whose FP32 function it keeps: every decoder block's MLP is copied into ``E`` identical experts
and a router picks ``top_k`` of them per token. transformers' Mixtral router computes
``softmax(logits)``, keeps the ``top_k`` largest probabilities and divides them by their sum,
so the routing weights of a token sum to 1 (up to float rounding); with identical experts
``sum_k w_k * MLP(x) = MLP(x)``, whatever the router chooses. Attention, norms, rotary
embedding, embeddings (tied or not, as the dense model has them) are the dense model's.

The router matters once the experts are quantized one by one (each copy gets its own
scales, GPTQ updates and calibration tokens), and for measuring calibration coverage: it
should spread tokens over the experts as a trained router does, by content, unevenly but
with no dead expert. Random router rows applied to the raw normed hidden states do this
poorly: the hidden states of a Llama carry a shared component (a mean direction and a few
high-variance channels) that adds the same per-expert offset to most tokens' logits, so a
few experts take most tokens. The router of each block is therefore built from a short
seeded probe (random token ids ``[4, 64]`` through the dense model) of the block's MLP
inputs ``h`` (the post-attention RMSNorm outputs; the first position, the attention sink,
left out of the statistics):

    W_e = z_e / s            z_e ~ N(0, I) seeded, s the per-channel std of h (whitening)
    W   = W - (W m) m^T / |m|^2      m the mean of h: the shared direction gives no offset
    W   = W / std(W h)              logits of unit spread over the probe tokens

so each expert's logit is a random direction in the whitened, centred input space: tokens
with similar hidden states go to the same experts, and every expert receives a share.
Measured on SmolLM2-135M, 512 held-out tokens of austen_pp, E = 8, top-2, 30 blocks: the
per-block coefficient of variation of the tokens per expert is 0.63 on average (0.87 at
worst) and the least-used expert of any block gets 8% of the mean load; plain seeded
Gaussian rows give 0.83 (1.46) and 2%.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import ConfigError

LLAMA_FAMILY = "llama"  # the adapter family (lowbit.adapters.family) upcycling starts from
PROBE_SHAPE = (4, 64)  # probe token ids [batch, seq] for the router statistics


def _check_dense(model: nn.Module) -> None:
    """ConfigError unless ``model`` is of the ``llama`` adapter family (pre-norm attention,
    gated MLP, ``w`` norms: :mod:`lowbit.adapters.llama`) with Mixtral's attention: no
    q/k/v/o biases (Qwen2 has them), no q/k norms (Qwen3 has them)."""
    from lowbit.adapters import family

    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    fam = family(model)
    if fam != LLAMA_FAMILY:
        raise ConfigError(f"upcycle_moe: {type(model).__name__} (model_type {kind!r}, adapter "
                          f"family {fam!r}) is not Llama-like; expected a transformers causal "
                          f"LM of the {LLAMA_FAMILY!r} adapter family (pre-norm attention + "
                          "gated MLP)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise ConfigError(f"upcycle_moe: config.{flag} is true; Mixtral has no biases in "
                              "attention or experts, expected a model without them")
    if getattr(cfg, "pretraining_tp", 1) != 1:
        raise ConfigError(f"upcycle_moe: config.pretraining_tp = {cfg.pretraining_tp}, "
                          "expected 1")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) != cfg.num_hidden_layers:
        raise ConfigError("upcycle_moe: expected model.model.layers with "
                          f"config.num_hidden_layers = {cfg.num_hidden_layers} blocks")
    for i, layer in enumerate(layers):
        att = layer.self_attn
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if getattr(getattr(att, n, None), "bias", None) is not None:
                raise ConfigError(f"upcycle_moe: {type(model).__name__} (model_type {kind!r}) "
                                  f"is not Llama-like: model.layers.{i}.self_attn.{n} has a "
                                  "bias, Mixtral's attention has none")
        for n in ("q_norm", "k_norm"):
            if getattr(att, n, None) is not None:
                raise ConfigError(f"upcycle_moe: {type(model).__name__} (model_type {kind!r}) "
                                  f"is not Llama-like: model.layers.{i}.self_attn.{n} "
                                  "exists, Mixtral's attention has no q/k norms")
        for n in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, n, None)
            if type(lin) is not nn.Linear:
                raise ConfigError(f"upcycle_moe: model.layers.{i}.mlp.{n} is "
                                  f"{type(lin).__name__}, expected a plain nn.Linear (upcycle "
                                  "the float model, before quantizing it)")


def _mixtral_config(cfg, num_experts: int, top_k: int):
    from transformers import MixtralConfig

    from lowbit.adapters import facts

    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "hidden_act",
            "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
            "attention_dropout")
    kw = {k: getattr(cfg, k) for k in keep}
    kw["head_dim"] = facts.head_dim(cfg)
    kw["sliding_window"] = getattr(cfg, "sliding_window", None)  # Mistral's; Llama has none
    rope = getattr(cfg, "rope_parameters", None)
    if not rope or "rope_theta" not in rope:
        raise ConfigError("upcycle_moe: config.rope_parameters with rope_theta expected "
                          f"(got {rope!r})")
    kw["rope_parameters"] = dict(rope)
    out = MixtralConfig(num_local_experts=num_experts, num_experts_per_tok=top_k,
                        router_jitter_noise=0.0, output_router_logits=False, **kw)
    out._attn_implementation = cfg._attn_implementation
    out.dtype = getattr(cfg, "dtype", None)
    return out


@torch.no_grad()
def _mlp_inputs(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """Each block's MLP input ``[N, H]`` (float32) on seeded random token ids, position 0
    left out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, PROBE_SHAPE, generator=g)
    dev = next(model.parameters()).device
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, a: seen.append(a[0][:, 1:].reshape(-1, a[0].shape[-1]).float().cpu()))
        for layer in model.model.layers]
    try:
        model(ids.to(dev))
    finally:
        for h in hooks:
            h.remove()
    return seen


def router_weight(h: torch.Tensor, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Router weight ``[E, H]`` (float32) for MLP inputs ``h [N, H]``: seeded Gaussian rows
    in the whitened input space, the mean direction of ``h`` projected out, scaled so the
    logits ``W h`` have unit standard deviation over ``h`` (module docstring)."""
    s = h.std(0)
    s = s + 1e-3 * s.mean() + 1e-12
    w = torch.randn(num_experts, h.shape[1], generator=generator) / s
    m = h.mean(0)
    w = w - torch.outer(w @ m, m) / m.dot(m).clamp_min(1e-12)
    return w / (h @ w.t()).std().clamp_min(1e-12)


@torch.no_grad()
def upcycle_moe(dense_model: nn.Module, num_experts: int = 8, top_k: int = 2, seed: int = 0):
    """A ``MixtralForCausalLM`` computing the same function as ``dense_model``.

    ``dense_model``: a float transformers Llama (or Mistral) causal LM, not quantized (its
    MLP projections plain ``nn.Linear``), no attention/MLP biases; it is not changed. Each
    block's MLP ``[I, H]``/``[H, I]`` weights become ``num_experts`` identical experts
    (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``), routed
    ``top_k`` per token with renormalised softmax weights (sum 1, so the output is the dense
    MLP's); the routers (``mlp.gate.weight [E, H]``) are built deterministically from
    ``seed`` (module docstring). Embeddings stay tied when the dense model's are;
    rope, norm epsilon, head sizes, token ids, attention implementation, dtype and device are
    copied. Returns the model in eval mode. ConfigError for a model that is not Llama-like
    or for bad ``num_experts``/``top_k`` (``1 <= top_k <= num_experts``, ``num_experts >= 2``).
    """
    from transformers import MixtralForCausalLM

    if not isinstance(num_experts, int) or num_experts < 2:
        raise ConfigError(f"upcycle_moe: num_experts must be an int >= 2, got {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ConfigError(f"upcycle_moe: top_k must be an int in [1, num_experts="
                          f"{num_experts}], got {top_k!r}")
    _check_dense(dense_model)
    cfg = _mixtral_config(dense_model.config, num_experts, top_k)
    p0 = next(dense_model.parameters())
    dtype, dev = p0.dtype, p0.device
    inputs = _mlp_inputs(dense_model.eval(), seed)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in dense_model.state_dict().items():
        if ".mlp." not in k:
            sd[k] = v
    for i, layer in enumerate(dense_model.model.layers):
        mlp, p = layer.mlp, f"model.layers.{i}.mlp"
        gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)      # [2I, H]
        sd[f"{p}.experts.gate_up_proj"] = gu.unsqueeze(0).repeat(num_experts, 1, 1)
        sd[f"{p}.experts.down_proj"] = mlp.down_proj.weight.unsqueeze(0).repeat(
            num_experts, 1, 1)
        sd[f"{p}.gate.weight"] = router_weight(inputs[i], num_experts, gen).to(dtype)
    with torch.device("meta"):
        moe = MixtralForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(sd, strict=False, assign=True)
    if unexpected or [k for k in missing if not (cfg.tie_word_embeddings and
                                                 k == "lm_head.weight")]:
        raise ConfigError(f"upcycle_moe: state dict mismatch building Mixtral: missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        moe.lm_head.weight = moe.model.embed_tokens.weight
    # non-persistent buffers (rotary inverse frequencies) are recomputed off the meta device
    moe.model.rotary_emb = type(moe.model.rotary_emb)(cfg)
    meta = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
    if meta:
        raise ConfigError(f"upcycle_moe: tensors left unset after the copy: {meta[:3]}")
    return moe.to(device=dev, dtype=dtype).eval()


__all__ = ["LLAMA_FAMILY", "router_weight", "upcycle_moe"]
