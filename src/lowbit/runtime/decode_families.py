"""What differs between decoder families, for :class:`lowbit.runtime.FastDecoder`: read
once, when the decoder is built, into a :class:`Plan` and per-layer :class:`RMS` norms.

Where each fact comes from:

* **norm kind** (``w`` or ``1 + w``): the family's adapter (:func:`lowbit.adapters.get_adapter`),
  measured by :func:`lowbit.adapters.norm_kind` when the adapter does not declare it; whether
  a norm multiplies its weight before or after casting back to the model's dtype (Llama:
  after; Gemma, OLMo-2: before, in float32) is measured by running one norm of each class
  (:func:`make_norm`); a module that is not an RMSNorm is refused;
* **fused projections** (Phi-3's ``qkv_proj``, ``gate_up_proj``): the adapter's declared
  layout (:func:`lowbit.adapters.fused_parts`), which must be ``q, k, v`` / ``gate, up``;
* **where the norms sit**: the block's own norms: ``input_layernorm`` before attention
  (absent in OLMo-2), ``pre_feedforward_layernorm`` before the MLP when present (Gemma-2/3;
  then ``post_attention_layernorm`` normalises the attention output), else
  ``post_attention_layernorm`` before the MLP (Llama) unless the block has no
  ``input_layernorm`` (OLMo-2: it normalises the attention output), and
  ``post_feedforward_layernorm`` on the MLP output; any other norm in the block is refused;
  q/k norms (``self_attn.q_norm``/``k_norm``) per head (Qwen3, Gemma-3: ``[head_dim]``) or
  over the whole projection (OLMo-2: ``[heads * head_dim]``), by their width;
* **scalars**: the family's declared facts (:func:`lowbit.adapters.facts.scalars`): the
  attention scale (Gemma's ``query_pre_attn_scalar ** -0.5``, Granite's
  ``attention_multiplier``), attention and final-logit soft-caps (Gemma-2), the embedding
  scale (Gemma's ``sqrt(hidden)``, applied by its own embedding module in the model's dtype,
  measured by :func:`embed_multiplier`; Granite's ``embedding_multiplier``, applied by the
  decoder), the residual multiplier and the logits scale (Granite); the attention modules'
  own ``scaling`` is checked against them;
* **config values** (``model.config``, the text config of a multimodal model):
  ``hidden_activation``/``hidden_act``, ``layer_types`` + ``sliding_window`` (else
  ``sliding_window`` on every layer, as Mistral and Phi-3 do), checked against the attention
  modules' ``sliding_window``;
* **rotary tables**: the model's rotary module, once per cache size: one table per layer type
  (Gemma-3's local and global bases), partial rotary when the table is narrower than a head
  (Phi-3's ``partial_rotary_factor``), LongRoPE's short and long tables (the long one from a
  call whose last position exceeds ``original_max_position_embeddings``, as transformers
  switches; when a sequence first outgrows that length the decoder runs it again from the
  start on the long factors, as transformers' Phi-3 ``generate`` drops its cache there), its
  width checked against :func:`lowbit.adapters.facts.rotary_dim`. ``dynamic`` RoPE is
  refused.

Refused with a :class:`ConfigError` naming the piece: other activations, layer types other
than full/sliding attention, bidirectional attention, a norm the decoder does not know where
to apply, a soft-cap set where transformers' forward ignores it (Gemma-3's attention, the
multimodal Gemma-3's final logits).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError

_ACTS: dict[str, Callable] = {
    "silu": F.silu, "swish": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}
_ATTN_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_norm", "k_norm"}


class RMS:
    """``y = (offset + w) * x / rms(x)`` as one family computes it: ``first``: the weight
    multiplies in float32 before the cast back to ``x``'s dtype (Gemma, OLMo-2), else after
    (Llama). ``x [..., C]`` -> same shape and dtype."""

    __slots__ = ("w", "eps", "first")

    def __init__(self, w: torch.Tensor, eps: float, first: bool):
        self.w, self.eps, self.first = w, eps, first

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (n * self.w).to(x.dtype) if self.first else self.w * n.to(x.dtype)


def make_norm(mod: nn.Module, name: str, kind: str, dtype: torch.dtype,
              styles: dict) -> RMS:
    """An :class:`RMS` computing what the RMSNorm ``mod`` computes on ``dtype`` inputs.

    ``kind``: ``"w"`` or ``"1+w"``. Whether the weight multiplies before or after the cast
    is measured on a seeded ``[3, C]`` input, once per class (``styles`` caches it); a module
    that matches neither form (not an RMSNorm) raises :class:`ConfigError` naming ``name``.
    """
    from lowbit.adapters import NORM_KINDS

    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    w = getattr(mod, "weight", None)
    if eps is None or not isinstance(w, torch.Tensor) or w.dim() != 1 \
            or getattr(mod, "bias", None) is not None:
        raise ConfigError(f"FastDecoder needs RMSNorm layers (a [C] weight, an eps, no bias); "
                          f"{name} is a {type(mod).__name__}")
    w, off = w.detach(), NORM_KINDS[kind]
    cands = {False: RMS(w if off == 0 else (w.float() + off).to(w.dtype), float(eps), False),
             True: RMS(w.float() + off, float(eps), True)}
    key = (type(mod), kind)
    if key not in styles:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(3, w.numel(), generator=g) * 3).to(w.device, dtype)
        with torch.no_grad():
            ref = mod(x).float()
        errs = {s: float((c(x).float() - ref).abs().max() / ref.abs().max())
                for s, c in cands.items()}
        best = min(errs, key=lambda s: (errs[s], s))  # a tie (float32): after the cast
        tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
        if errs[best] > tol:
            raise ConfigError(f"{name} ({type(mod).__name__}) does not compute an RMSNorm "
                              f"scaled by {kind} (closest form off by {errs[best]:.1e} of its "
                              f"largest output); FastDecoder cannot run it")
        styles[key] = best
    return cands[styles[key]]


@dataclass
class Plan:
    """The per-model pieces the general decode step reads (see the module doc)."""

    base: nn.Module
    lm_head: nn.Module
    cfg: object
    act: Callable = F.silu
    scale: float = 1.0
    default_scale: bool = True
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_mult: float | None = None
    resid_mult: float | None = None
    logit_mult: float | None = None
    windows: list = field(default_factory=list)   # per layer: int or None
    rope_keys: list = field(default_factory=list)  # per layer: key into Rope tables
    rope: "Rope | None" = None

    @property
    def plain(self) -> bool:
        """Nothing beyond Llama's layer (the fast step applies; windows checked per cache)."""
        return (self.act is F.silu and self.default_scale and self.attn_softcap is None
                and self.final_softcap is None and self.embed_mult is None
                and self.resid_mult is None and self.logit_mult is None and self.rope.plain)


def text_parts(model: nn.Module):
    """``(config, base model, lm_head)``: the config of the decoder blocks
    (:func:`lowbit.adapters.facts.text_config`: a multimodal model's text config), the module
    holding the blocks the adapter finds (``model.model``; the text tower
    ``model.model.language_model`` of a multimodal model) and ``model.lm_head``."""
    from lowbit.adapters import facts, get_adapter

    a = get_adapter(model)
    found = a.find_blocks(model) if a is not None else None
    prefix = found[0].rpartition(".")[0] if found is not None else None
    base = model.get_submodule(prefix) if prefix else None
    if base is None or getattr(base, "layers", None) is not found[1] or \
            not hasattr(base, "embed_tokens") or not hasattr(model, "lm_head"):
        raise ConfigError(f"FastDecoder needs a causal LM whose adapter finds its blocks at "
                          f"<base>.layers beside <base>.embed_tokens, and an lm_head; got "
                          f"{type(model).__name__}")
    return facts.text_config(model), base, model.lm_head


def embed_multiplier(embed: nn.Module, scale: float, name: str) -> float | None:
    """What the decoder multiplies ``embed(ids)`` by to get the family's scaled embeddings:
    None when ``scale`` is 1 or the module applies it itself (Gemma's scaled embedding),
    ``scale`` when it returns plain rows (Granite's multiplier is applied by the model).
    Measured on the first rows; a module doing neither raises :class:`ConfigError`."""
    if scale == 1.0:
        return None
    w = getattr(embed, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ConfigError(f"{name} ({type(embed).__name__}) has no [vocab, hidden] weight to "
                          f"tell whether it applies the embedding scale {scale:g} itself")
    ids = torch.arange(min(8, w.shape[0]), device=w.device)
    with torch.no_grad():
        got, rows = embed(ids).float(), w[ids].float()
    r = float((got * rows).sum() / rows.square().sum())
    if math.isclose(r, 1.0, rel_tol=1e-2):
        return scale
    if math.isclose(r, scale, rel_tol=1e-2):
        return None
    raise ConfigError(f"{name} ({type(embed).__name__}) scales its rows by {r:.4g}, neither 1 "
                      f"nor the family's embedding scale {scale:g}")


def build_plan(model: nn.Module, head_dim: int, multimodal: bool) -> Plan:
    """The :class:`Plan` of ``model`` (ConfigError naming the piece FastDecoder lacks).
    Scalars (embedding scale, multipliers, attention scale, soft-caps) are the family's
    declared facts (:func:`lowbit.adapters.facts.scalars`); the rest is read from the
    config and checked against the modules."""
    from lowbit.adapters import facts, family, is_norm

    cfg, base, lm_head = text_parts(model)
    p = Plan(base=base, lm_head=lm_head, cfg=cfg)
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act not in _ACTS:
        raise ConfigError(f"FastDecoder runs MLP activations {', '.join(_ACTS)}; got {act!r}")
    p.act = F.silu if act in ("silu", "swish") else _ACTS[act]
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ConfigError("FastDecoder decodes causally; the config sets "
                          "use_bidirectional_attention")
    sc = facts.scalars(model)
    p.default_scale = sc["attention_scale"] is None
    p.scale = head_dim ** -0.5 if p.default_scale else float(sc["attention_scale"])
    p.attn_softcap, p.final_softcap = sc["attn_logit_softcap"], sc["final_logit_softcap"]
    ignored = facts.ignored_config(model)
    if ignored:
        where = (f"the text config of a multimodal model ({type(model).__name__})"
                 if multimodal else f"a {cfg.model_type} config")
        raise ConfigError(f"{', '.join(f'{k} ({v})' for k, v in ignored.items())} set on {where}"
                          f", whose transformers forward does not apply it (declared by "
                          f"adapter {family(model)}); FastDecoder will not guess (unset it)")
    p.embed_mult = embed_multiplier(base.embed_tokens, float(sc["embedding_scale"]),
                                    "embed_tokens")
    p.resid_mult = None if sc["residual_multiplier"] == 1.0 else float(sc["residual_multiplier"])
    p.logit_mult = None if sc["logits_scale"] == 1.0 else float(sc["logits_scale"])
    n = len(base.layers)
    types = getattr(cfg, "layer_types", None)
    win = getattr(cfg, "sliding_window", None)
    if types is not None:
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise ConfigError(f"FastDecoder runs full_attention and sliding_attention layers; "
                              f"layer_types has {', '.join(bad)}")
        if "sliding_attention" in types and win is None:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window "
                              "is None")
        p.windows = [win if t == "sliding_attention" else None for t in types[:n]]
    else:
        p.windows = [win] * n
    for i, blk in enumerate(base.layers):
        a = blk.self_attn
        s = getattr(a, "scaling", None)
        if isinstance(s, float) and not math.isclose(s, p.scale, rel_tol=1e-6):
            raise ConfigError(f"layer {i}: the attention scales by {s}, the config gives "
                              f"{p.scale}; FastDecoder will not guess which applies")
        if hasattr(a, "sliding_window") and a.sliding_window != p.windows[i]:
            raise ConfigError(f"layer {i}: the attention's sliding_window is "
                              f"{a.sliding_window}, the config gives {p.windows[i]}")
        extra = sorted(c for c, m in a.named_children() if c not in _ATTN_PARTS and is_norm(m))
        if extra:
            raise ConfigError(f"layer {i}: FastDecoder does not know the attention's "
                              f"{', '.join(extra)}")
    p.rope = Rope(base, cfg, types, head_dim, base.embed_tokens.weight.dtype,
                  base.embed_tokens.weight.device)
    want = facts.rotary_dim(cfg)
    if p.rope.rot_dim != want:
        raise ConfigError(f"the rotary module turns {p.rope.rot_dim} dims of each head, the "
                          f"config says {want} (partial_rotary_factor); FastDecoder will not "
                          f"guess")
    p.rope_keys = [p.rope.key(types[i] if types is not None else None) for i in range(n)]
    return p


class Rope:
    """Rotary tables from the model's rotary module: :meth:`build` once per cache size,
    then :meth:`at` per forward call (see the module doc). ``rot_dim``: the table width
    (< ``head_dim``: partial rotary)."""

    def __init__(self, base: nn.Module, cfg, types, head_dim: int, dtype, device):
        self.mod = base.rotary_emb
        self.head_dim = head_dim
        self.by_type = "layer_type" in inspect.signature(self.mod.forward).parameters
        if self.by_type and types is None:
            raise ConfigError("the rotary module takes a layer type, the config has no "
                              "layer_types")
        self.keys = sorted(set(types)) if self.by_type else [None]
        rt = getattr(self.mod, "rope_type", "default")
        rts = {k: (rt.get(k, "default") if isinstance(rt, dict) else rt) for k in self.keys}
        bad = sorted({str(v) for v in rts.values() if "dynamic" in str(v)})
        if bad:
            raise ConfigError(f"FastDecoder precomputes the rotary tables; rope_type "
                              f"{', '.join(map(repr, bad))} changes them with the length "
                              f"(use generate)")
        self.orig = {}  # key -> original_max_position_embeddings of a LongRoPE table
        for k, v in rts.items():
            if v == "longrope":
                rp = getattr(cfg, "rope_parameters", None) or {}
                rp = rp.get(k, rp) if k is not None else rp
                om = rp.get("original_max_position_embeddings",
                            getattr(cfg, "original_max_position_embeddings", None))
                if om is None:
                    raise ConfigError("rope_type 'longrope' needs "
                                      "original_max_position_embeddings in the config")
                self.orig[k] = int(om)
        self.tabs: dict = {}
        x = torch.zeros(1, 1, head_dim, dtype=dtype, device=device)
        self.rot_dim = self._call(self.keys[0], 1, x)[0].shape[-1]
        if self.rot_dim > head_dim or self.rot_dim % 2:
            raise ConfigError(f"rotary tables of width {self.rot_dim} do not fit heads of "
                              f"{head_dim}")

    @property
    def plain(self) -> bool:
        """One full-width table for every layer (what the Llama step reads)."""
        return not self.by_type and not self.orig and self.rot_dim == self.head_dim

    def key(self, layer_type):
        """The table key of a layer of ``layer_type``."""
        return layer_type if self.by_type else None

    def _call(self, k, n: int, x: torch.Tensor):
        pos = torch.arange(n, device=x.device)[None]
        cos, sin = self.mod(x[:, :n], pos, k) if self.by_type else self.mod(x[:, :n], pos)
        return cos[0], sin[0]

    def build(self, length: int, dtype, device) -> None:
        """Tables for positions ``0 .. length-1``: ``{key: (cos, sin, long_cos, long_sin)}``
        (``[length, rot]``; the long pair None unless LongRoPE needs it)."""
        x = torch.zeros(1, length, self.head_dim, dtype=dtype, device=device)
        for k in self.keys:
            om = self.orig.get(k)
            cos, sin = self._call(k, min(length, om) if om else length, x)
            lc = ls = None
            if om and length > om:
                lc, ls = self._call(k, length, x)
                self._call(k, 1, x)  # leave the module on its short factors
            self.tabs[k] = (cos, sin, lc, ls)

    def at(self, pos: int, t: int) -> dict:
        """``{key: (cos, sin)}`` ``[T, 1, rot]`` for positions ``pos .. pos+t-1``; a LongRoPE
        table switches to the long factors when ``pos + t`` exceeds its original length
        (as transformers decides per forward call)."""
        out = {}
        for k, (c, s, lc, ls) in self.tabs.items():
            if lc is not None and pos + t > self.orig[k]:
                c, s = lc, ls
            out[k] = (c[pos:pos + t, None], s[pos:pos + t, None])
        return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    """Rotary embedding of ``x [T, H, D]`` with ``cos``/``sin [T, 1, rot]`` on the first
    ``rot`` dims (``rot < D``: partial rotary, the rest passes)."""
    if rot < x.shape[-1]:
        return torch.cat((rotate(x[..., :rot], cos, sin, rot), x[..., rot:]), -1)
    half = rot // 2
    # tables in float32 for a bfloat16 model (OLMo-2): rotate in float32, cast back
    return (x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin).to(x.dtype)


def attend(q, k, v, pos: int, t: int, window: int | None, scale: float,
           softcap: float | None, gqa: bool, gqa_kwarg: bool) -> torch.Tensor:
    """Causal attention of queries ``q [1, H, T, D]`` at positions ``pos .. pos+t-1`` over the
    cached ``k, v [1, Hkv, >= pos+t, D]``; a key is seen when ``q - window < kv <= q``
    (``window`` None: all earlier keys). ``softcap``: ``tanh(s / c) * c`` on the scaled
    scores before the mask (Gemma-2), computed as transformers' eager attention (softmax in
    float32). Returns ``[1, H, T, D]``."""
    n = pos + t
    lo = 0 if window is None else max(0, pos + 1 - window)  # the first key any row sees
    k, v = k[:, :, lo:n], v[:, :, lo:n]
    mask, causal = None, False
    if t > 1:
        if pos == 0 and (window is None or window >= t):
            causal = True
        else:
            rows = pos + torch.arange(t, device=q.device)[:, None]
            cols = lo + torch.arange(n - lo, device=q.device)[None]
            mask = cols <= rows
            if window is not None:
                mask &= cols > rows - window
    if softcap is None:
        if gqa_kwarg:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  scale=scale, enable_gqa=gqa)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    if causal:
        mask = torch.ones(t, n, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), v)
