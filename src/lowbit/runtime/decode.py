"""A lean greedy decode loop for Llama-architecture decoders (batch 1), on packed or float
weights.

``transformers``' ``generate`` spends most of a small model's decode step outside the
matmuls: Python-level cache and mask bookkeeping, generation utilities, and seven separate
projections per layer; on SmolLM2-135M with int4 weights it decodes at ~40 tokens/s where
:class:`FastDecoder` reaches ~60 (``bench/runtime.py``; ~1700 dispatched aten ops per token
against ~2300, and 4 matmuls per layer instead of 7):

* q/k/v and gate/up are fused into one matmul each (:func:`fuse_linears`; packed int4 and
  int8 weight-only layers and float ``nn.Linear`` layers are concatenated, other layers are
  called one by one);
* a static KV cache per layer, written in place; the rotary ``cos``/``sin`` tables computed
  once by the model's own rotary module (every non-dynamic RoPE scaling);
* RMSNorm as one ``F.rms_norm`` in float32 (as ``LlamaRMSNorm`` computes it);
* ``scaled_dot_product_attention`` with grouped-query heads, no mask in decode;
* the LM head on the last position only; float layers of a bfloat16 model run a decode row
  through ``torch.mv`` (:func:`float_linear`).

The model is not changed: the fused matmuls share the model's weight storage (views) where
the kernel allows it; packed int4 layers need their group scales contiguous, so those are
copied (:meth:`FastDecoder.extra_nbytes`: 4.4 MB, 3.7% of SmolLM2-135M's int4 g64 packed
bytes).

Supported ``model_type``: ``llama``, ``mistral``, ``qwen2`` (SiLU MLP, RMSNorm, no sliding
window shorter than the sequence). Tolerance against the model's own forward: ~1e-5
(relative to the largest logit) in float32; greedy tokens equal ``generate``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.hardware import fell_back, took_hardware
from lowbit.runtime.packed import PackedLinear

SUPPORTED = ("llama", "mistral", "qwen2")
FUSED_PATH = "runtime.fused_linear"  # name in lowbit.hardware.hardware_path_report()
_GQA_KWARG = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# --- fused projections ----------------------------------------------------------------------
def float_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear`` for ``x [T, in]``; a decode row (T = 1) in bfloat16/float16 goes through
    ``torch.mv``, 2-2.6x faster there on the CPU than the GEMM path (same fp32
    accumulation; float32 is as fast either way and keeps ``F.linear``)."""
    if x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
        y = torch.mv(weight, x[0])[None]
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _plain_linear(mod: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is a plain tensor (not a tensor subclass such as
    torchao's quantized weights, which may not implement ``cat`` or ``mv``)."""
    return type(mod) is nn.Linear and type(mod.weight.data) is torch.Tensor


def _call(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``, with a plain ``nn.Linear`` through :func:`float_linear`."""
    if _plain_linear(mod):
        return float_linear(x, mod.weight, mod.bias)
    return mod(x)


class FusedLinear(nn.Module):
    """``x [T, in] -> [T, sum(out_i)]``: the outputs of several linears sharing one input,
    in order. ``mode`` is how: ``"packed"`` (one concatenated :class:`PackedLinear`),
    ``"float"`` (one concatenated weight) or ``"split"`` (each layer called, outputs
    concatenated)."""

    def __init__(self, mode: str, sizes: list[int], layer: nn.Module | None = None,
                 parts: list[nn.Module] | None = None, weight=None, bias=None):
        super().__init__()
        self.mode, self.sizes = mode, sizes
        self.layer = layer
        self.parts = nn.ModuleList(parts or [])
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mode == "packed":
            return self.layer(x)
        if self.mode == "float":
            return float_linear(x, self.weight, self.bias)
        return torch.cat([_call(p, x) for p in self.parts], -1)

    def extra_nbytes(self) -> int:
        """Bytes this fusion holds beyond the model's own weights (copied scales)."""
        if self.mode != "packed":
            return 0
        return sum(b.numel() * b.element_size() for k, b in self.layer._buffers.items()
                   if b is not None and k in self.layer._copied)


def _cat_bias(mods):
    """The concatenated biases (zeros for a layer without one), or None if none has one."""
    bs = [m.bias for m in mods]
    ref = next((b for b in bs if b is not None), None)
    if ref is None:
        return None
    return torch.cat([b.detach() if b is not None else
                      ref.new_zeros(m.out_features) for b, m in zip(bs, mods)])


def _share_rows(mods, name: str, fused: torch.Tensor) -> None:
    """Point each module's buffer/parameter ``name`` at its rows of ``fused`` (a view)."""
    o = 0
    for m in mods:
        n = getattr(m, name).shape[0]
        view = fused[o:o + n]
        old = getattr(m, name)
        if isinstance(old, nn.Parameter):
            setattr(m, name, nn.Parameter(view, requires_grad=old.requires_grad))
        else:
            m._buffers[name] = view
        o += n


def fuse_linears(mods: list[nn.Module], probe: bool = True) -> FusedLinear:
    """One matmul for linears that share an input (q/k/v, gate/up).

    Packed ``int4_weight_only`` layers (same group size, dtypes, every ``out`` a multiple of
    64) and ``int8_weight_only`` layers concatenate their packed weights along the output;
    plain float ``nn.Linear`` layers their weights. The modules then use row views of the
    fused weight (no second copy; int4 scales stay copies, torch's kernel reads them
    contiguously). Anything else (mixed kernels, fake-quantized layers) is called layer by
    layer. ``probe``: check the fused matmul against the separate ones on a random input;
    on a mismatch the layers are called one by one and a
    :class:`~lowbit.hardware.HardwareFallbackWarning` says so (once per process). The path
    is recorded as ``runtime.fused_linear`` in :func:`lowbit.hardware.hardware_path_report`.
    """
    sizes = [m.out_features for m in mods]
    fused = _try_fuse(mods)
    if fused is not None and probe:
        x = torch.randn(3, mods[0].in_features, generator=torch.Generator().manual_seed(0))
        dt = fused.weight.dtype if fused.mode == "float" else fused.layer.compute_dtype
        dev = (fused.weight if fused.mode == "float" else next(fused.layer.buffers())).device
        x = x.to(dev, dt)
        with torch.no_grad():
            ref = torch.cat([m(x) for m in mods], -1)
            got = fused(x)
            if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * ref.abs().max()):
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
                fell_back(FUSED_PATH, RuntimeError(
                    f"the fused {fused.mode} matmul differs from the separate layers by "
                    f"{err:.2e} of the largest output"), "one call per layer")
                fused = None
            else:
                took_hardware(FUSED_PATH)
    if fused is None:
        return FusedLinear("split", sizes, parts=mods)
    return fused


def _try_fuse(mods) -> FusedLinear | None:
    sizes = [m.out_features for m in mods]
    first = mods[0]
    if any(m.in_features != first.in_features for m in mods):
        return None
    if all(_plain_linear(m) for m in mods):
        if len({(m.weight.dtype, m.weight.device) for m in mods}) != 1:
            return None
        w = torch.cat([m.weight.detach() for m in mods])
        b = _cat_bias(mods)
        _share_rows(mods, "weight", w)
        return FusedLinear("float", sizes, weight=w, bias=b)
    if not all(isinstance(m, PackedLinear) for m in mods):
        return None
    kern = {m.kernel for m in mods}
    if len(kern) != 1 or len({m.compute_dtype for m in mods}) != 1:
        return None
    kern = kern.pop()
    out = PackedLinear(kern, first.in_features, sum(sizes), None, first.compute_dtype)
    out.bias = None if all(m.bias is None for m in mods) else \
        nn.Parameter(_cat_bias(mods), requires_grad=False)
    if kern == "int4_weight_only":
        if any(n % 64 for n in sizes) or len({(m.group_size, m.act_dtype) for m in mods}) != 1:
            return None
        w = torch.cat([m.w_packed for m in mods])
        out.register_buffer("w_packed", w)
        out.register_buffer("scale_zeros", torch.cat([m.scale_zeros for m in mods], 1))
        out.group_size, out.act_dtype = first.group_size, first.act_dtype
        _share_rows(mods, "w_packed", w)
        out._copied = ("scale_zeros",)
    elif kern == "int8_weight_only":
        if len({m.act_dtype for m in mods}) != 1:
            return None
        w = torch.cat([m.w_int8 for m in mods])
        s = torch.cat([m.w_scale for m in mods])
        out.register_buffer("w_int8", w)
        out.register_buffer("w_scale", s)
        out.act_dtype = first.act_dtype
        _share_rows(mods, "w_int8", w)
        _share_rows(mods, "w_scale", s)
        out._copied = ()
    else:
        return None
    out.spec = first.spec
    out.packed_nbytes = sum(m.packed_nbytes for m in mods)
    return FusedLinear("packed", sizes, layer=out)


# --- the decoder ----------------------------------------------------------------------------
class _Layer:
    __slots__ = ("ln1", "eps1", "ln2", "eps2", "qkv", "o", "gate_up", "down", "k", "v")


def _norm_fn(norm: nn.Module):
    """``(weight, eps)`` of an RMSNorm computed as ``LlamaRMSNorm`` does; ConfigError for
    other norms."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if not type(norm).__name__.endswith("RMSNorm") or eps is None or w is None:
        raise ConfigError(f"FastDecoder needs Llama-style RMSNorm layers; got "
                          f"{type(norm).__name__}")
    return w.detach(), float(eps)


class FastDecoder:
    """Greedy decoding of a Llama-architecture causal LM (batch 1) with fused projections
    and a static KV cache; see the module docstring.

    ``model``: a ``LlamaForCausalLM``-like model (``model.model.layers``, ``lm_head``), float
    or converted by :func:`lowbit.runtime.convert`; it keeps working as before. ``fuse``:
    fuse q/k/v and gate/up (:func:`fuse_linears`). The cache is sized per
    :meth:`generate` call (``prompt + new tokens``) and reused when large enough.
    """

    def __init__(self, model: nn.Module, fuse: bool = True):
        cfg = model.config
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED:
            raise ConfigError(f"FastDecoder supports model_type {', '.join(SUPPORTED)}; got "
                              f"{mt!r} (use the model's own generate)")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ConfigError(f"FastDecoder needs a SiLU MLP; got hidden_act "
                              f"{cfg.hidden_act!r}")
        base = model.model
        rope_type = getattr(base.rotary_emb, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ConfigError(f"FastDecoder precomputes the rotary tables; rope_type "
                              f"{rope_type!r} changes them with the length (use generate)")
        self.model = model
        self.sliding_window = getattr(cfg, "sliding_window", None) \
            if getattr(cfg, "use_sliding_window", mt == "mistral") else None
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.embed = base.embed_tokens
        self.dtype = self.embed.weight.dtype
        self.norm_w, self.norm_eps = _norm_fn(base.norm)
        self.lm_head = model.lm_head
        self.layers = []
        for blk in base.layers:
            a, mlp = blk.self_attn, blk.mlp
            L = _Layer()
            L.ln1, L.eps1 = _norm_fn(blk.input_layernorm)
            L.ln2, L.eps2 = _norm_fn(blk.post_attention_layernorm)
            qkv, gu = [a.q_proj, a.k_proj, a.v_proj], [mlp.gate_proj, mlp.up_proj]
            L.qkv = fuse_linears(qkv) if fuse else FusedLinear("split", [], parts=qkv)
            L.gate_up = fuse_linears(gu) if fuse else FusedLinear("split", [], parts=gu)
            L.o, L.down = a.o_proj, mlp.down_proj
            L.k = L.v = None
            self.layers.append(L)
        self.cache_len = 0
        self.cos = self.sin = None

    def extra_nbytes(self) -> int:
        """Bytes of weights the decoder holds beyond the model's (copied int4 scales)."""
        return sum(f.extra_nbytes() for L in self.layers for f in (L.qkv, L.gate_up))

    # --- cache ------------------------------------------------------------------------------
    def _ensure_cache(self, length: int) -> None:
        if self.sliding_window is not None and length > self.sliding_window:
            raise ConfigError(f"sequence of {length} tokens exceeds the sliding window "
                              f"({self.sliding_window}); FastDecoder keeps full attention")
        if length <= self.cache_len:
            return
        dev = self.embed.weight.device
        n = self.cache_len  # a longer cache keeps what the shorter one held
        for L in self.layers:
            k = torch.zeros(1, self.n_kv, length, self.head_dim, dtype=self.dtype, device=dev)
            v = torch.zeros_like(k)
            if n:
                k[:, :, :n], v[:, :, :n] = L.k, L.v
            L.k, L.v = k, v
        x = torch.zeros(1, length, self.head_dim, dtype=self.dtype, device=dev)
        cos, sin = self.model.model.rotary_emb(x, torch.arange(length, device=dev)[None])
        self.cos, self.sin = cos[0], sin[0]  # [length, head_dim]
        self.cache_len = length

    # --- forward ----------------------------------------------------------------------------
    @staticmethod
    def _rms(x, w, eps):
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def _attend(self, q, k, v, pos: int, t: int):
        if t == 1:
            mask, causal = None, False
        elif pos == 0:
            mask, causal = None, True
        else:  # a chunk after a cached prefix: row i sees columns <= pos + i
            cols = torch.arange(pos + t, device=q.device)
            mask = cols[None, :] <= (pos + torch.arange(t, device=q.device))[:, None]
            causal = False
        if _GQA_KWARG:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=self.n_kv != self.n_heads)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def forward(self, ids: torch.Tensor, pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens ``ids [T]`` at positions ``pos .. pos+T-1`` (the cache holds the
        earlier ones); returns logits ``[vocab]`` of the last token (``[T, vocab]`` with
        ``all_logits``), in the model's dtype."""
        t = ids.shape[0]
        self._ensure_cache(pos + t)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        cos, sin = self.cos[pos:pos + t, None], self.sin[pos:pos + t, None]  # [T, 1, hd]
        half = hd // 2
        h = self.embed(ids)  # [T, D]
        for L in self.layers:
            x = self._rms(h, L.ln1, L.eps1)
            qkv = L.qkv(x).view(t, nh + 2 * nkv, hd)
            qk = qkv[:, :nh + nkv]
            rot = torch.cat((-qk[..., half:], qk[..., :half]), -1)
            qk = qk * cos + rot * sin
            q = qk[:, :nh].transpose(0, 1)[None]
            L.k[0, :, pos:pos + t] = qk[:, nh:].transpose(0, 1)
            L.v[0, :, pos:pos + t] = qkv[:, nh + nkv:].transpose(0, 1)
            o = self._attend(q, L.k[:, :, :pos + t], L.v[:, :, :pos + t], pos, t)
            h = h + _call(L.o, o[0].transpose(0, 1).reshape(t, nh * hd))
            x = self._rms(h, L.ln2, L.eps2)
            g, u = L.gate_up(x).chunk(2, -1)
            h = h + _call(L.down, F.silu(g) * u)
        h = h if all_logits else h[-1:]
        logits = _call(self.lm_head, self._rms(h, self.norm_w, self.norm_eps))
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 128,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` (``[T]`` or ``[1, T]`` token ids): returns
        ``[1, T + n]`` with ``n <= max_new_tokens`` new tokens (stops after an EOS token),
        as ``model.generate(..., do_sample=False)`` does."""
        ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 \
            else input_ids
        if ids.dim() != 1 or ids.numel() == 0:
            raise ConfigError(f"FastDecoder.generate takes one sequence of token ids, [T] or "
                              f"[1, T]; got shape {list(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        eos = set() if eos_token_id is None else \
            {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        ids = ids.to(self.embed.weight.device)
        t = ids.shape[0]
        self._ensure_cache(t + max_new_tokens)
        logits = self.forward(ids, 0)
        out = [ids]
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if (eos and int(nxt) in eos) or i == max_new_tokens - 1:
                break
            logits = self.forward(nxt, t + i)
        return torch.cat(out)[None]


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 128,
             eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """Greedy decoding with :class:`FastDecoder` (built once per model and kept on it):
    ``input_ids [1, T]`` -> ``[1, T + n]``. Rebuild after changing the model's weights by
    deleting ``model._lowbit_decoder``."""
    dec = getattr(model, "_lowbit_decoder", None)
    if dec is None:
        dec = FastDecoder(model)
        object.__setattr__(model, "_lowbit_decoder", dec)
    return dec.generate(input_ids, max_new_tokens, eos_token_id)
