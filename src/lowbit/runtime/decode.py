"""A lean greedy decode loop for decoder-only LMs (batch 1), on packed or float weights:
Llama's layer, and the families that change it (Qwen3, Gemma-2/3, Phi-3, Granite, OLMo-2).

``transformers``' ``generate`` spends most of a small model's decode step outside the
matmuls: Python-level cache and mask bookkeeping, generation utilities, and seven separate
projections per layer. :class:`FastDecoder` runs the same function with fewer dispatched
ops (4 matmuls per layer instead of 7), lowbit's native decode operators where they build,
and optionally its step captured by ``torch.compile`` (figures: ``bench/runtime.py``,
docs/runtime.md):

* q/k/v and gate/up are fused into one matmul each (:func:`fuse_linears`; packed int4 and
  int8 weight-only layers and float ``nn.Linear`` layers are concatenated, other layers are
  called one by one);
* a static KV cache per layer, written in place; the rotary ``cos``/``sin`` tables computed
  once by the model's own rotary module (every non-dynamic RoPE scaling);
* RMSNorm as one ``F.rms_norm`` in float32 (as ``LlamaRMSNorm`` computes it);
* prompts through ``scaled_dot_product_attention`` with grouped-query heads; a decode token
  through ``torch.ops.lowbit.decode_attn`` (bfloat16 caches: the filled positions only,
  float32 inside) or :func:`_one_query`;
* the LM head on the last position only; float layers of a bfloat16 model run a decode row
  through lowbit's native bfloat16 GEMV or ``torch.mv`` (:func:`float_linear`); int4 and
  int8 packed layers through their kernels' decode paths (:mod:`lowbit.runtime.kernels`).

The model is not changed: the fused matmuls share the model's weight storage (views) where
the kernel allows it; packed int4 layers need their group scales contiguous, so those are
copied (:meth:`FastDecoder.extra_nbytes`: 4.4 MB, 3.7% of SmolLM2-135M's int4 g64 packed
bytes).

Supported families (:data:`SUPPORTED`: the names of their adapters,
:func:`lowbit.adapters.family`; a model is recognised by its adapter, never by class
names), by ``model_type``: ``llama``, ``mistral``, ``qwen2`` and
``phi3`` run the Llama step above (Phi-3's fused ``qkv_proj``/``gate_up_proj`` are one
matmul each already, split as its adapter declares); ``qwen3`` (q/k norms), ``gemma2``,
``gemma3_text`` and ``gemma3`` (the multimodal class's text tower, on text ids: ``1 + w``
norms around attention and MLP, scaled embeddings, GELU, soft-caps, sliding-window layers
with their own rotary base), ``granite`` (multipliers), ``olmo2`` (post-norms, q/k norms
over the whole projection), and any model with a sliding window shorter than its cache,
partial rotary or LongRoPE, run a general step whose pieces are chosen once, when the
decoder is built (:mod:`lowbit.runtime.decode_families`, which says where each fact comes
from and what is refused). Tolerance against the model's own forward: ~1e-5 (relative to
the largest logit) in float32 (measured: <= 1e-6 on every family, 0 for a whole prompt);
greedy tokens equal ``generate``'s.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.adapters import facts, family, fused_parts, get_adapter, is_norm, norm_kind, \
    registered
from lowbit.errors import ConfigError, FormatError
from lowbit.hardware import fell_back, not_attempted, took_hardware
from lowbit.nn.rotation import suspended
from lowbit.runtime.decode_families import attend, build_plan, make_norm, rotate, text_parts
from lowbit.runtime.packed import PackedLinear

#: adapter families (:func:`lowbit.adapters.family`) FastDecoder runs; the model types they
#: serve are the adapters' own (:func:`supported_model_types`)
SUPPORTED = ("llama", "gemma2", "gemma3_mm", "phi3", "granite", "olmo2")
from lowbit.runtime.fuse import (FUSED_PATH, FusedLinear, _call, _plain_linear,  # noqa: E402,F401
                                 _try_fuse, bf16_gemv, float_linear, fuse_linears)
_GQA_KWARG = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
COMPILE_PATH = "runtime.decode_compiled"  # name in lowbit.hardware.hardware_path_report()
CACHE_BUCKET = 256  # a compiled decoder sizes its cache in multiples of this
from lowbit.runtime.decode_step import (ATTN_PATH, _GUARD_FILTER, _RotatedNorm,  # noqa: E402,F401
                                        _native_attention, _one_query, _rotation, _step_guards)
def supported_model_types() -> list[str]:
    """``config.model_type`` values of the :data:`SUPPORTED` families, as their adapters
    declare them (``llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3, ...``)."""
    by_name = {a.name: a for a in registered()}
    return [t for f in SUPPORTED for t in by_name[f].model_types]


# --- fused projections ----------------------------------------------------------------------
class _Layer:
    __slots__ = ("ln1", "eps1", "ln2", "eps2", "qkv", "o", "gate_up", "down", "k", "v",
                 "n_in", "n_pa", "n_mlp", "n_pm", "qk", "qn", "kn", "win", "rk", "plain",
                 "r3")


def _fused_one(model, blk, name: str, want: tuple[str, ...], sizes: list[int]):
    """A fused projection of the block (Phi-3's ``qkv_proj``/``gate_up_proj``) as one
    :class:`FusedLinear`, its layout read from the family's adapter declaration
    (:func:`lowbit.adapters.fused_parts`)."""
    mod = blk.get_submodule(name)
    parts = fused_parts(model, blk, name)
    got = tuple(p for p, _ in parts)
    widths = [sl.stop - sl.start for _, sl in parts]
    if got != want or widths != sizes or sum(widths) != mod.out_features:
        raise ConfigError(f"{name}: FastDecoder needs the parts {want} of widths {sizes} in "
                          f"this order ({sum(sizes)} outputs, the module has "
                          f"{mod.out_features}); the adapter declares {dict(zip(got, widths))}")
    return FusedLinear("one", sizes, layer=mod)


class FastDecoder:
    """Greedy decoding of a decoder-only causal LM (batch 1) with fused projections and a
    static KV cache; see the module docstring for the families and what each needs.

    ``model``: a causal LM (``model.model.layers``, ``lm_head``; or a multimodal model's text
    tower, ``model.model.language_model``), float or converted by
    :func:`lowbit.runtime.convert`; it keeps working as before. ``fuse``: fuse q/k/v and
    gate/up (:func:`fuse_linears`). The cache is sized per :meth:`generate` call
    (``prompt + new tokens``) and reused when large enough.

    ``compile``: capture the single-token step of the Llama layer with ``torch.compile``
    (inductor, which writes and builds C++ for the CPU: a C compiler is needed; the first
    token of each cache size pays the build, minutes for SmolLM2 on 2 cores, then
    inductor's on-disk cache), removing most of eager PyTorch's per-op overhead: the step
    runs over a static cache (sized in multiples of :data:`CACHE_BUCKET`) with a position
    mask, the same function as the eager step. A failure to compile is recorded as
    ``runtime.decode_compiled`` in :func:`lowbit.hardware.hardware_path_report`, warned
    once, and the eager step runs; the general step of the other families is not captured.
    The captured step checks its logits for NaN/Inf (FormatError) instead of each layer's
    activations. Families beyond Llama's layer
    (:mod:`lowbit.runtime.decode_families`) run a general step chosen here, once; a Llama,
    Mistral, Qwen2 or Phi-3 model without those pieces keeps the Llama step.
    """

    def __init__(self, model: nn.Module, fuse: bool = True, compile: bool = False):
        if family(model) not in SUPPORTED:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            raise ConfigError(f"FastDecoder supports model_type "
                              f"{', '.join(supported_model_types())}; got {mt!r} (use the "
                              f"model's own generate)")
        kv = [n for n, m in model.named_modules()
              if any(getattr(m, a, None) is not None and m._modules[a].is_enabled
                     for a in ("k_cache_quantizer", "v_cache_quantizer",
                               "k_cache_quantizer_fallback", "v_cache_quantizer_fallback")
                     if a in m._modules)]
        if kv:
            raise ConfigError(f"FastDecoder keeps its KV cache in float and {kv[0]} quantizes "
                              f"its KV cache ({len(kv)} attention modules): decoding with it "
                              "would not be the quantized model; use the model's own "
                              "generate (lowbit generate --loop hf)")
        cfg, base, lm_head = text_parts(model)
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = facts.head_dim(cfg)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        self.qkv_sizes = [nh * hd, nkv * hd, nkv * hd]
        self._fused = {f.name for f in facts.fused(model)}
        self.plan = build_plan(model, hd, get_adapter(model).text_config is not None)
        self.embed = base.embed_tokens
        self.dtype = self.embed.weight.dtype
        self.lm_head = lm_head
        if self.dtype == torch.bfloat16 and self.embed.weight.device.type == "cpu":
            bf16_gemv()  # decided (native build + probe) before any step is captured
        adapter = get_adapter(model)
        declared = adapter.norm if adapter is not None else None
        # the norm the adapter declares in front of the attention and the MLP projections
        self._feeds = {}
        for nm, lins in (adapter.groups if adapter is not None else ()):
            for role in ("self_attn.", "mlp."):
                if any(x.startswith(role) for x in lins):
                    self._feeds[role[:-1]] = nm
        kinds, styles = {}, {}

        def norm(mod, name):
            if mod is None:
                return None
            with suspended(mod, "norm_output"):  # the norm's own function is measured
                kind = declared or kinds.get(type(mod))
                if kind is None:
                    kind = kinds[type(mod)] = norm_kind(mod, name=name)
                n = make_norm(mod, name, kind, self.dtype, styles)
            rot = _rotation(mod, "output_rotation")
            return n if rot is None else _RotatedNorm(n, rot)

        self.final_norm = norm(base.norm, "model.norm")
        self.norm_w, self.norm_eps = self.final_norm.w, self.final_norm.eps
        self.layers = []
        for i, blk in enumerate(base.layers):
            self.layers.append(self._layer(model, blk, i, norm, fuse))
        self._plain = self.plan.plain and self._llama_norm(base.norm, self.final_norm) and \
            all(L.plain for L in self.layers)
        self._fast = self._plain
        self._attn_native = self._plain and _native_attention(self.dtype, self.head_dim,
                                                              self.embed.weight.device)
        self.cache_len = 0
        self.cos = self.sin = None
        self._ids = None
        self.compile = bool(compile)
        self._compiled = None
        self._next = None
        if self.compile and not self._plain:
            not_attempted(COMPILE_PATH, "this family's general step (only the Llama step is "
                          "captured)")

    @staticmethod
    def _llama_norm(mod, n) -> bool:
        """``n`` scales by the module's own weight after the cast (Llama's RMSNorm) and
        nothing follows it (no online output rotation)."""
        return n is not None and not isinstance(n, _RotatedNorm) and not n.first and n.w.data_ptr() == mod.weight.data_ptr() \
            and n.w.dtype == mod.weight.dtype

    def _layer(self, model, blk, i: int, norm, fuse: bool) -> _Layer:
        a, mlp = blk.self_attn, blk.mlp
        g = {n: getattr(blk, n, None) for n in ("input_layernorm", "post_attention_layernorm",
                                                "pre_feedforward_layernorm",
                                                "post_feedforward_layernorm")}
        extra = sorted(n for n, m in blk.named_children() if n not in g and is_norm(m))
        if extra:
            raise ConfigError(f"layer {i}: FastDecoder does not know where "
                              f"{', '.join(extra)} applies")
        L = _Layer()
        L.n_in = norm(g["input_layernorm"], f"layer {i} input_layernorm")
        pa = norm(g["post_attention_layernorm"], f"layer {i} post_attention_layernorm")
        if g["pre_feedforward_layernorm"] is not None:  # Gemma-2/3: norms around both
            L.n_pa = pa
            L.n_mlp = norm(g["pre_feedforward_layernorm"], f"layer {i} pre_feedforward_layernorm")
        elif L.n_in is None:  # OLMo-2: norms on the outputs only
            L.n_pa, L.n_mlp = pa, None
        else:  # Llama: post_attention_layernorm feeds the MLP
            L.n_pa, L.n_mlp = None, pa
        L.n_pm = norm(g["post_feedforward_layernorm"], f"layer {i} post_feedforward_layernorm")
        if L.n_mlp is None and L.n_pa is None:
            raise ConfigError(f"layer {i}: no input_layernorm and no post_attention_layernorm")
        mlp_in = "pre_feedforward_layernorm" if g["pre_feedforward_layernorm"] is not None \
            else "post_attention_layernorm" if L.n_in is not None else None
        ours = {"self_attn": "input_layernorm" if L.n_in is not None else None, "mlp": mlp_in}
        for role, nm in self._feeds.items():
            if nm != ours[role]:
                raise ConfigError(f"layer {i}: the adapter declares {nm} in front of {role}, "
                                  f"FastDecoder's layout has {ours[role]}")
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        L.qk = L.qn = L.kn = None
        qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        if (qn is None) != (kn is None):
            raise ConfigError(f"layer {i}: the attention has only one of q_norm and k_norm")
        if qn is not None:
            wq, wk = qn.weight.numel(), kn.weight.numel()
            if (wq, wk) == (hd, hd):
                L.qk = "head"  # Qwen3, Gemma-3: per head
            elif (wq, wk) == (nh * hd, nkv * hd):
                L.qk = "proj"  # OLMo-2: over the whole projection
            else:
                raise ConfigError(f"layer {i}: q_norm/k_norm of widths {wq}/{wk} are neither "
                                  f"per head ({hd}) nor per projection ({nh * hd}/{nkv * hd})")
            L.qn, L.kn = norm(qn, f"layer {i} q_norm"), norm(kn, f"layer {i} k_norm")
        if "self_attn.qkv_proj" in self._fused:
            L.qkv = _fused_one(model, blk, "self_attn.qkv_proj", ("q", "k", "v"),
                               self.qkv_sizes)
        else:
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            L.qkv = fuse_linears(qkv) if fuse else FusedLinear("split", [], parts=qkv)
        if "mlp.gate_up_proj" in self._fused:
            inter = getattr(self.plan.cfg, "intermediate_size", None)
            L.gate_up = _fused_one(model, blk, "mlp.gate_up_proj", ("gate", "up"),
                                   [inter, inter])
        else:
            gu = [mlp.gate_proj, mlp.up_proj]
            L.gate_up = fuse_linears(gu) if fuse else FusedLinear("split", [], parts=gu)
        L.o, L.down = a.o_proj, mlp.down_proj
        L.k = L.v = None
        L.win, L.rk = self.plan.windows[i], self.plan.rope_keys[i]
        L.r3 = _rotation(a, "qk_rotation")  # R3: after RoPE, on queries and keys
        if L.r3 is not None and L.r3.size != hd:
            raise ConfigError(f"layer {i}: self_attn.qk_rotation is {L.r3.size} wide, the "
                              f"heads {hd}")
        L.plain = (L.n_pa is None and L.n_pm is None and L.qk is None
                   and self._llama_norm(g["input_layernorm"], L.n_in)
                   and self._llama_norm(g["post_attention_layernorm"], L.n_mlp))
        if L.plain:
            L.ln1, L.eps1, L.ln2, L.eps2 = L.n_in.w, L.n_in.eps, L.n_mlp.w, L.n_mlp.eps
        return L

    def extra_nbytes(self) -> int:
        """Bytes of weights the decoder holds beyond the model's (copied int4 scales)."""
        return sum(f.extra_nbytes() for L in self.layers for f in (L.qkv, L.gate_up))

    # --- cache ------------------------------------------------------------------------------
    def _ensure_cache(self, length: int) -> None:
        if length <= self.cache_len:
            return
        if self.compile and self._plain:  # fewer shapes, fewer recompilations
            length = -(-length // CACHE_BUCKET) * CACHE_BUCKET
        dev = self.embed.weight.device
        n = self.cache_len  # a longer cache keeps what the shorter one held
        for L in self.layers:
            k = torch.zeros(1, self.n_kv, length, self.head_dim, dtype=self.dtype, device=dev)
            v = torch.zeros_like(k)
            if n:
                k[:, :, :n], v[:, :, :n] = L.k, L.v
            L.k, L.v = k, v
        rope = self.plan.rope
        rope.build(length, self.dtype, dev)
        if rope.orig:
            ids = torch.zeros(length, dtype=torch.long, device=dev)
            if n:
                ids[:n] = self._ids[:n]
            self._ids = ids
        if self._plain:
            self.cos, self.sin = rope.tabs[None][:2]  # [length, head_dim]
        # the Llama step keeps no window: it runs while every window covers the cache
        self._fast = self._plain and all(w is None or w >= length for w in self.plan.windows)
        self.cache_len = length

    # --- forward ----------------------------------------------------------------------------
    @staticmethod
    def _rms(x, w, eps):
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def _attend(self, q, k, v, pos: int, t: int):
        if t == 1:  # one query: see _one_query
            return _one_query(q, k, v, self.n_kv)
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
        self._next = None  # the greedy token, where a compiled step computed it
        if not self._fast:
            return self._forward_general(ids, pos, t, all_logits)
        if t == 1 and self.compile:
            out = self._compiled_step(ids, pos)
            if out is not None:
                return out[None] if all_logits else out
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        cos, sin = self.cos[pos:pos + t, None], self.sin[pos:pos + t, None]  # [T, 1, hd]
        half = hd // 2
        h = self.embed(ids)  # [T, D]
        one = t == 1 and self._attn_native
        pt = torch.tensor([pos], device=ids.device) if one else None
        for L in self.layers:
            x = self._rms(h, L.ln1, L.eps1)
            qkv = L.qkv(x).view(t, nh + 2 * nkv, hd)
            qk = qkv[:, :nh + nkv]
            rot = torch.cat((-qk[..., half:], qk[..., :half]), -1)
            qk = qk * cos + rot * sin
            if L.r3 is not None:
                qk = L.r3(qk)
            q = qk[:, :nh].transpose(0, 1)[None]
            L.k[0, :, pos:pos + t] = qk[:, nh:].transpose(0, 1)
            L.v[0, :, pos:pos + t] = qkv[:, nh + nkv:].transpose(0, 1)
            if one:
                o = torch.ops.lowbit.decode_attn(qk[0, :nh].contiguous(), L.k[0], L.v[0], pt,
                                                 hd ** -0.5).reshape(1, nh * hd)
            else:
                o = self._attend(q, L.k[:, :, :pos + t], L.v[:, :, :pos + t], pos, t)
                o = o[0].transpose(0, 1).reshape(t, nh * hd)
            h = h + _call(L.o, o)
            x = self._rms(h, L.ln2, L.eps2)
            g, u = L.gate_up(x).chunk(2, -1)
            h = h + _call(L.down, F.silu(g) * u)
        h = h if all_logits else h[-1:]
        logits = _call(self.lm_head, self._rms(h, self.norm_w, self.norm_eps))
        return logits if all_logits else logits[0]

    def _static_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode token of the Llama step with static shapes (what is captured):
        ``ids [1]`` at position ``pos [1]`` (a tensor), written into the cache with
        ``index_copy_``, attending over the filled cache (the native operator) or over the
        whole cache with a mask; logits ``[vocab]``."""
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        cos, sin = self.cos.index_select(0, pos)[:, None], self.sin.index_select(0, pos)[:, None]
        half = hd // 2
        mask = (torch.arange(self.cache_len, device=pos.device) <= pos)[None, None]
        h = self.embed(ids)  # [1, D]
        for L in self.layers:
            x = self._rms(h, L.ln1, L.eps1)
            qkv = L.qkv(x).view(1, nh + 2 * nkv, hd)
            qk = qkv[:, :nh + nkv]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            if L.r3 is not None:
                qk = L.r3(qk)
            L.k.index_copy_(2, pos, qk[:, nh:].transpose(0, 1)[None])
            L.v.index_copy_(2, pos, qkv[:, nh + nkv:].transpose(0, 1)[None])
            if self._attn_native:  # the filled cache only: no mask
                o = torch.ops.lowbit.decode_attn(qk[0, :nh].contiguous(), L.k[0], L.v[0], pos,
                                                 hd ** -0.5).reshape(1, nh * hd)
            else:
                o = _one_query(qk[:, :nh].transpose(0, 1)[None], L.k, L.v, nkv, mask)
                o = o[0].transpose(0, 1).reshape(1, nh * hd)
            h = h + _call(L.o, o)
            x = self._rms(h, L.ln2, L.eps2)
            g, u = L.gate_up(x).chunk(2, -1)
            h = h + _call(L.down, F.silu(g) * u)
        logits = _call(self.lm_head, self._rms(h, self.norm_w, self.norm_eps))[0]
        # the greedy token and the finiteness check inside the captured step (each ~0.2 ms
        # a token as separate eager calls)
        return logits, logits.argmax(-1, keepdim=True), torch.isfinite(logits).all()

    def _own_step(self):
        """:meth:`_static_step` bound to this decoder through a code object of its own.
        Dynamo keeps its compiled graphs per code object; with the guards on the weights
        dropped (:func:`_step_guards`), two decoders sharing one code object could run each
        other's graph. A copy per decoder keeps their graphs apart (and out of each other's
        recompilation limit)."""
        f = FastDecoder._static_step
        code = f.__code__.replace(co_name=f"_static_step_{id(self):x}")
        return types.MethodType(types.FunctionType(code, f.__globals__, code.co_name), self)

    def _compiled_step(self, ids: torch.Tensor, pos: int) -> torch.Tensor | None:
        """The decode step through ``torch.compile`` (inductor; C++ on the CPU), or None
        after a failure (recorded and warned once; the eager step runs from then on)."""
        if not _GQA_KWARG:
            not_attempted(COMPILE_PATH, f"torch {torch.__version__} (needs 2.5: enable_gqa)")
            self.compile = False
            return None
        try:
            if self._compiled is None:
                # cpp_wrapper: the calls between kernels are C++ too (fewer Python calls per token)
                opts = {"cpp_wrapper": True}
                if _GUARD_FILTER:
                    opts["guard_filter_fn"] = _step_guards
                self._compiled = torch.compile(self._own_step(), fullgraph=True,
                                               dynamic=False, options=opts)
            out, nxt, finite = self._compiled(ids, torch.tensor([pos], device=ids.device))
        except Exception as e:  # noqa: BLE001 - no compiler, an op inductor cannot lower ...
            fell_back(COMPILE_PATH, e, "the eager decode step")
            self.compile = False
            return None
        took_hardware(COMPILE_PATH)
        self._next = nxt
        if not bool(finite):  # the captured step checks no input itself
            raise FormatError(f"decode step at position {pos}: the logits hold NaN/Inf "
                              "values (the model's activations overflowed or were NaN)")
        return out

    def _forward_general(self, ids: torch.Tensor, pos: int, t: int, all_logits: bool):
        """:meth:`forward` with every family piece of :attr:`plan` (see
        :mod:`lowbit.runtime.decode_families`)."""
        p = self.plan
        if p.rope.orig:  # LongRoPE: the token ids, to recompute at the switch to long factors
            self._ids[pos:pos + t] = ids
            om = min(p.rope.orig.values())
            if 0 < pos <= om < pos + t:
                # the sequence outgrows the original length: as transformers' Phi-3 generate,
                # drop the cache and run the whole sequence again on the long factors
                out = self._forward_general(self._ids[:pos + t], 0, pos + t, all_logits)
                return out[pos:] if all_logits else out
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        tabs, rot, gqa = p.rope.at(pos, t), p.rope.rot_dim, nkv != nh
        rm = p.resid_mult
        h = self.embed(ids)  # [T, D]
        if p.embed_mult is not None:
            h = h * p.embed_mult
        for L in self.layers:
            x = h if L.n_in is None else L.n_in(h)
            q, k, v = L.qkv(x).split(self.qkv_sizes, -1)
            if L.qk == "proj":
                q, k = L.qn(q), L.kn(k)
            q, k, v = q.reshape(t, nh, hd), k.reshape(t, nkv, hd), v.reshape(t, nkv, hd)
            if L.qk == "head":
                q, k = L.qn(q), L.kn(k)
            cos, sin = tabs[L.rk]
            q, k = rotate(q, cos, sin, rot), rotate(k, cos, sin, rot)
            if L.r3 is not None:
                q, k = L.r3(q), L.r3(k)
            L.k[0, :, pos:pos + t] = k.transpose(0, 1)
            L.v[0, :, pos:pos + t] = v.transpose(0, 1)
            o = attend(q.transpose(0, 1)[None], L.k, L.v, pos, t, L.win, p.scale,
                       p.attn_softcap, gqa, _GQA_KWARG)
            a = _call(L.o, o[0].transpose(0, 1).reshape(t, nh * hd))
            if L.n_pa is not None:
                a = L.n_pa(a)
            h = h + (a if rm is None else a * rm)
            x = h if L.n_mlp is None else L.n_mlp(h)
            g, u = L.gate_up(x).chunk(2, -1)
            m = _call(L.down, p.act(g) * u)
            if L.n_pm is not None:
                m = L.n_pm(m)
            h = h + (m if rm is None else m * rm)
        h = h if all_logits else h[-1:]
        logits = _call(self.lm_head, self.final_norm(h))
        if p.logit_mult is not None:
            logits = logits * p.logit_mult
        if p.final_softcap is not None:
            logits = torch.tanh(logits / p.final_softcap) * p.final_softcap
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
            nxt = logits.argmax(-1, keepdim=True) if self._next is None else self._next
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
