"""Pieces of :class:`lowbit.runtime.decode.FastDecoder`'s single-token step, split out of
:mod:`lowbit.runtime.decode` (which re-exports them): the one-query attention (torch ops or
lowbit's native operator), which of dynamo's guards the compiled step keeps, and a norm
followed by an online output rotation."""

from __future__ import annotations

import re

import torch
from torch import nn

from lowbit.hardware import not_attempted
from lowbit.runtime import native

ATTN_PATH = "runtime.decode_attn_native"


def _native_attention(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether the Llama step's one-query attention runs lowbit's native operator
    (``torch.ops.lowbit.decode_attn``: reads only the filled cache, float32 inside), recorded
    as ``runtime.decode_attn_native``; else :func:`_one_query` (the same function).
    bfloat16 caches only: a float32 model keeps torch's ops, whose sums match the model's own
    attention bit for bit (the native sums differ by ~1e-7, enough to flip a later bfloat16
    rounding of a weight-only kernel's input)."""
    if device.type != "cpu":
        return False  # a CPU operator: other devices keep torch's ops, nothing to record
    if dtype != torch.bfloat16 or head_dim % 16 or head_dim > 256:
        not_attempted(ATTN_PATH, f"{dtype} cache with head size {head_dim} (bfloat16, a "
                      "multiple of 16 up to 256)")
        return False
    return native.choose(ATTN_PATH, native.decode_attn_ready,
                         "the one-query attention in torch ops (slower, the same function)")


#: torch.compile takes a ``guard_filter_fn`` option (it came with these helpers)
_GUARD_FILTER = hasattr(torch.compiler, "skip_all_guards_unsafe")
#: guards on the decoder's own weights and layer objects (fixed once it is built); the KV
#: cache of a layer (``self.layers[i].k``, ``.v``) is not among them
_FIXED_GUARD = re.compile(r"^(self\.(embed|lm_head|norm_w)\b|self\.layers\[\d+\]"
                          r"(?!\.[kv]$))")


def _step_guards(entries) -> list[bool]:
    """Which of dynamo's guards the compiled decode step keeps (``guard_filter_fn``).

    Checking every guard costs ~1.2 ms a token on SmolLM2-135M (one tensor match per
    weight, module-hook and type checks per layer), a tenth of the step. The weights and
    the layer structure belong to the decoder and never change after it is built, so their
    guards are dropped; everything that can change between calls keeps its guard: the
    inputs (``ids``, ``pos``), the KV cache and rotary tables (re-allocated when the cache
    grows), the cache length, and torch's global state (grad mode, default device, ...)."""
    return [not (_FIXED_GUARD.match(e.name) or e.guard_type == "EMPTY_NN_MODULE_HOOKS_DICT")
            for e in entries]


def _one_query(q, k, v, n_kv: int, mask=None) -> torch.Tensor:
    """Attention of one query position, ``q [1, H, 1, d]`` over ``k, v [1, n_kv, L, d]``
    (grouped-query heads: query head ``i`` reads key/value head ``i // (H / n_kv)``), scale
    ``d^-0.5``, optional ``mask [1, 1, L]`` (True: attend); ``[1, H, 1, d]`` in ``q``'s
    dtype. Two small batched matmuls and a softmax in float32, as the CPU flash kernel
    accumulates, without its setup (~0.3 ms a call at decode sizes on 2 cores)."""
    h, d = q.shape[1], q.shape[-1]
    qq = q[0, :, 0].float().view(n_kv, h // n_kv, d)
    att = torch.matmul(qq, k[0].float().transpose(1, 2)) * d ** -0.5  # [n_kv, rep, L]
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    o = torch.matmul(torch.softmax(att, -1), v[0].float())  # [n_kv, rep, d]
    return o.reshape(1, h, 1, d).to(q.dtype)


class _RotatedNorm:
    """A decoder norm (:func:`lowbit.runtime.decode_families.make_norm`) followed by the
    module's online ``output_rotation`` (:mod:`lowbit.nn.rotation`)."""

    def __init__(self, norm, rot: nn.Module):
        self.norm, self.rot = norm, rot

    def __getattr__(self, k):  # w, eps, first: the norm's (not during copy/unpickling)
        if k.startswith("__") or k in ("norm", "rot"):
            raise AttributeError(k)
        return getattr(self.norm, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rot(self.norm(x))


def _rotation(mod: nn.Module | None, attr: str):
    return None if mod is None else mod._modules.get(attr)
