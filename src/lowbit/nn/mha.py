"""Quantized ``nn.MultiheadAttention``: its packed ``in_proj_weight`` and its ``out_proj``.

``nn.MultiheadAttention`` keeps the q/k/v projections as one bare parameter
``in_proj_weight`` ``[3E, E]`` (+ ``in_proj_bias`` ``[3E]``) and reads ``out_proj.weight``
directly inside ``F.multi_head_attention_forward`` (``out_proj.forward`` is never called).
So neither is quantized by swapping Linears. :class:`QuantMultiheadAttention` is the
in-place swap (same parameters, same ``state_dict`` keys plus the quantizers'):

* ``weight_quantizer`` quantizes ``in_proj_weight`` **per q/k/v part** with the recipe's
  granularity rules, as three separate ``nn.Linear`` q/k/v would be: per channel and per
  group are the same on the packed matrix; per tensor becomes one scale per part (a 2-D
  block ``(E, E)``, noted on the quantizer); a 2-D block's rows must divide ``E``;
* ``input_quantizer`` quantizes the query (and key/value; one tensor for self-attention)
  and is calibrated like a Linear's; ``output_quantizer`` the in-projection's output;
* ``out_proj`` (a ``NonDynamicallyQuantizableLinear``) is quantized as its own Linear
  (:func:`lowbit.nn.modules.linear_subclass_class`) and is *called* by this forward, so its
  input/weight/output quantizers apply.

The forward keeps ``nn.MultiheadAttention.forward``'s signature and semantics (batch_first,
unbatched inputs, bool/float ``attn_mask`` [L, S] or [N*H, L, S], ``key_padding_mask``,
``need_weights`` with averaged or per-head weights, dropout, the ``is_causal`` hint needing
``attn_mask``), computed with ``F.scaled_dot_product_attention`` (or an explicit softmax
when the weights are returned). torch's inference fast path (``_native_multi_head_attention``)
is not used: its fused kernel reads float weights. Not supported (the module stays float,
named in the coverage report): separate ``kdim``/``vdim`` projections, ``add_bias_kv``,
``add_zero_attn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantSpec
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.modules import QuantMixin


class QuantMultiheadAttention(QuantMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with a quantized in-projection (see the module doc)."""

    weight_name = "in_proj_weight"

    @property
    def weight(self) -> torch.Tensor:
        """``in_proj_weight`` ``[3E, E]``: the weight the weight quantizer quantizes."""
        return self.in_proj_weight

    @staticmethod
    def unsupported(module: nn.MultiheadAttention) -> str | None:
        """Why ``module`` cannot be quantized by this class, or None when it can."""
        if not module._qkv_same_embed_dim:
            return ("separate q/k/v projection weights (kdim/vdim differ from embed_dim): "
                    "not supported")
        if module.bias_k is not None:
            return "add_bias_kv=True: not supported"
        if module.add_zero_attn:
            return "add_zero_attn=True: not supported"
        return None

    def _init_quantizers(self, weight: QuantSpec | None, input: QuantSpec | None,
                         output: QuantSpec | None, name: str = "") -> None:
        part, note = per_part_spec(weight, self.embed_dim, name)
        super()._init_quantizers(part, input, output, name)
        self.weight_quantizer.note = note

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        """As ``nn.MultiheadAttention.forward``: query ``[L, N, E]`` (``[N, L, E]`` with
        batch_first, ``[L, E]`` unbatched), key/value ``[S, N, E]``; returns
        ``(output like query, weights [N, L, S] or [N, H, L, S], or None)``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention)")
        same = key is query and value is query
        batched = query.dim() == 3
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        n, tgt, e = query.shape
        h, d = self.num_heads, self.head_dim
        w, b = self.quantized_weight(), self.in_proj_bias
        if same:
            qkv = self.output_quantizer(F.linear(self.input_quantizer(query), w, b))
            q, k, v = qkv.chunk(3, dim=-1)
        else:
            ws, bs = w.chunk(3), (None,) * 3 if b is None else b.chunk(3)
            q, k, v = (self.output_quantizer(F.linear(self.input_quantizer(x), wi, bi))
                       for x, wi, bi in zip((query, key, value), ws, bs))
        src = k.shape[1]
        q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))
        mask = _merged_mask(attn_mask, key_padding_mask, q.dtype, n, h, tgt, src)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            if p > 0:
                attn = F.dropout(attn, p=p)
            out = attn @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, e))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def per_part_spec(spec: QuantSpec | None, embed_dim: int, name: str = ""
                  ) -> tuple[QuantSpec | None, str]:
    """The spec that quantizes a packed ``[3E, E]`` in-projection per q/k/v part, and a note.

    Per tensor becomes a 2-D block ``(E, E)`` (one scale per part, bit for bit the same as
    quantizing each part per tensor); per channel and per group are unchanged; a 2-D block
    whose rows do not divide ``E`` is a ConfigError (it would span two parts)."""
    if spec is None:
        return None, ""
    if spec.granularity == "tensor" and spec.block_format is None:
        data = spec.model_dump()
        data.update(granularity="block", block=(embed_dim, embed_dim))
        return QuantSpec(**data), f"per q/k/v part: tensor -> block ({embed_dim}, {embed_dim})"
    if spec.granularity == "block" and embed_dim % spec.block[0]:
        raise ConfigError(f"layer {name}: block rows {spec.block[0]} do not divide the "
                          f"attention width {embed_dim}, so a block would span two of the "
                          "packed q/k/v projections; choose rows dividing it")
    return spec, ""


def _merged_mask(attn_mask, key_padding_mask, dtype, n: int, h: int, tgt: int, src: int):
    """One float additive mask broadcastable to ``[N, H, L, S]`` (or None), from
    nn.MultiheadAttention's ``attn_mask`` and ``key_padding_mask`` (bool: True = masked)."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                  other_name="", target_type=dtype, check_other=False)
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt, src):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}"
                                   f", but should be {(tgt, src)}.")
            mask = attn_mask.view(1, 1, tgt, src)
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (n * h, tgt, src):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}"
                                   f", but should be {(n * h, tgt, src)}.")
            mask = attn_mask.view(n, h, tgt, src)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(n, 1, 1, src)
        mask = kpm if mask is None else mask + kpm
    return mask


__all__ = ["QuantMultiheadAttention", "per_part_spec"]


def linear_input(mod: nn.Module, args: tuple, kwargs: dict | None = None,
                 name: str = "") -> torch.Tensor:
    """The input tensor of a linear-like module from a forward pre-hook's ``args``/``kwargs``
    (``[..., in]``). For an ``nn.MultiheadAttention`` that is its query, which is the input of
    the whole packed in-projection only under self-attention (query, key and value one
    tensor): cross-attention is a CalibrationError naming ``name``, since statistics taken
    from the query would be applied to the key/value parts. A layer with an online
    ``input_rotation`` (:mod:`lowbit.nn.rotation`) gives its input *after* the rotation:
    what its (rotated) weight multiplies, so every statistic (GPTQ's Hessian, AWQ,
    SmoothQuant, imatrix, calibration) sees that."""
    kwargs = kwargs or {}
    if not isinstance(mod, nn.MultiheadAttention):
        rot = mod._modules.get("input_rotation")
        return args[0] if rot is None else rot(args[0])
    q = args[0] if len(args) > 0 else kwargs.get("query")
    key = args[1] if len(args) > 1 else kwargs.get("key")
    value = args[2] if len(args) > 2 else kwargs.get("value")
    if q is None or key is not q or value is not q:
        raise CalibrationError(
            f"{name or type(mod).__name__}: nn.MultiheadAttention called with a key/value "
            "other than its query (cross-attention): its in-projection's statistics (GPTQ, "
            "AWQ, SmoothQuant) come from one input; exclude it from the algorithm steps or "
            "quantize it without them (weight-only RTN)")
    return q
