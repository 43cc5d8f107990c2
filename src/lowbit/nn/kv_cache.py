"""KV-cache quantization for decoder attention.

Transformers models (Llama, Qwen2/3, Gemma3, Mistral, GPT-2, OPT, ... in transformers >= 4.48)
call a shared attention function with the keys and values *after* they went through the
cache (``key_states, value_states = past_key_values.update(...)``) and after RoPE. lowbit
wraps those functions once (``sdpa`` and the per-model ``eager`` function): for an attention
module that carries ``k_cache_quantizer``/``v_cache_quantizer``, keys and values are
fake-quantized there. With static (calibrated) scales fake quantization is idempotent, so
quantizing the whole cache at each step equals quantizing each entry once as it enters the
cache — which is what a serving engine with an FP8/INT8 cache does.

Keys/values have shape ``[batch, kv_heads, seq, head_dim]``: ``granularity: channel`` means
per head (axis 1).

Modules that do not use the shared attention functions (hand-written attention) fall back to
quantizing the outputs of their key and value projections (before RoPE): an approximation,
reported in the summary.

The same wrapper applies a module's online ``qk_rotation`` (:mod:`lowbit.nn.rotation`, R3)
to the query and the keys first: after RoPE, before the KV-cache quantizers. The cache itself
holds un-rotated keys; rotating the keys read from it at each step gives the same values.
Modules without the shared functions cannot hold one (:func:`install_qk_hooks` refuses).
"""

from __future__ import annotations

import inspect
import sys

from torch import nn

from lowbit.core import QuantSpec
from lowbit.errors import ConfigError
from lowbit.nn.quantizer import TensorQuantizer

_INSTALLED: set[str] = set()


def _wrap(base):
    def attention(module, query, key, value, *args, **kwargs):
        rot = module._modules.get("qk_rotation")
        if rot is not None:  # R3: post-RoPE, pre-quantizer; [b, heads, seq, head_dim]
            query, key = rot(query), rot(key)
        kq = module._modules.get("k_cache_quantizer")
        if kq is not None:
            key = kq(key)
            value = module._modules["v_cache_quantizer"](value)
        fn = base if base is not None else sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, query, key, value, *args, **kwargs)

    attention.__lowbit_wrapped__ = True
    return attention


def install_attention_hooks(implementation: str = "sdpa") -> bool:
    """Wrap transformers' shared attention function ``implementation`` once (``sdpa``, or
    ``eager``: each model's own ``eager_attention_forward``); False when unavailable.
    Modules without KV quantizers or ``qk_rotation`` pass through the wrapper unchanged."""
    if implementation in _INSTALLED:
        return True
    try:
        from transformers.modeling_utils import AttentionInterface
    except Exception:
        return False
    mapping = AttentionInterface._global_mapping
    if implementation == "eager":
        if "eager" in mapping:
            return False
        mapping["eager"] = _wrap(None)
    elif implementation in mapping:
        if not getattr(mapping[implementation], "__lowbit_wrapped__", False):
            mapping[implementation] = _wrap(mapping[implementation])
    else:
        return False
    _INSTALLED.add(implementation)
    return True


def install_qk_hooks(model: nn.Module, module: nn.Module, name: str) -> None:
    """Make sure the attention wrapper runs for ``module`` (named ``name`` in ``model``), so
    that its ``qk_rotation`` is applied: the wrappers of the model's attention implementation
    and of ``sdpa`` and ``eager`` (so switching between those keeps the rotation) are
    installed. A module that does not call transformers' shared attention functions, or an
    implementation that cannot be wrapped, is a ConfigError naming the module: there is no
    exact place to rotate its post-RoPE queries and keys."""
    if not _uses_interface(module):
        raise ConfigError(f"module {name!r} ({type(module).__name__}) does not call "
                          f"transformers' shared attention functions: lowbit has no place to "
                          f"rotate its queries and keys after RoPE (q/k rotation, R3)")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    for i in dict.fromkeys((impl, "sdpa", "eager")):
        if not install_attention_hooks(i) and i == impl:
            raise ConfigError(f"module {name!r}: attention implementation {impl!r} cannot be "
                              f"wrapped by lowbit, so its q/k rotation would not be applied; "
                              f"use attn_implementation 'sdpa' or 'eager'")


def _uses_interface(module: nn.Module) -> bool:
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    mod = sys.modules.get(type(module).__module__)
    return "ALL_ATTENTION_FUNCTIONS" in src and hasattr(mod, "eager_attention_forward")


def _kv_projections(module: nn.Module):
    for k, v in (("k_proj", "v_proj"), ("key", "value"), ("k", "v")):
        if isinstance(getattr(module, k, None), nn.Module) and \
                isinstance(getattr(module, v, None), nn.Module):
            return getattr(module, k), getattr(module, v)
    return None


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules of a decoder: classes named ``*Attention`` with K/V projections
    or that call transformers' shared attention functions (outermost ones only)."""
    found = []
    for name, m in model.named_modules():
        cname = type(m).__name__
        if not cname.endswith("Attention") and not cname.endswith("Attn"):
            continue
        if any(name.startswith(p + ".") for p, _ in found):
            continue
        if _uses_interface(m) or _kv_projections(m) is not None:
            found.append((name, m))
    return found


def attach_kv_quantizers(model: nn.Module, spec: QuantSpec) -> list[tuple[str, str]]:
    """Add K and V cache quantizers to every attention module of ``model``.

    Returns ``(module name, method)`` pairs, method ``"attention"`` (exact, post-RoPE cache
    values) or ``"projection"`` (fallback on the K/V projection outputs).
    """
    if spec.granularity == "channel":
        spec = spec.model_copy(update={"axis": 1})
    done = []
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    hooks = install_attention_hooks(impl)
    for name, m in find_attention_modules(model):
        kq = TensorQuantizer(spec, "kv_cache", f"{name}.k_cache_quantizer")
        vq = TensorQuantizer(spec, "kv_cache", f"{name}.v_cache_quantizer")
        if hooks and _uses_interface(m):
            m.k_cache_quantizer = kq
            m.v_cache_quantizer = vq
            done.append((name, "attention"))
            continue
        proj = _kv_projections(m)
        if proj is None:
            continue
        flat = spec.model_copy(update={"axis": -1}) if spec.granularity == "channel" else spec
        kq.spec = vq.spec = flat
        m.k_cache_quantizer_fallback = kq
        m.v_cache_quantizer_fallback = vq
        proj[0].register_forward_hook(lambda mod, i, out, q=kq: q(out))
        proj[1].register_forward_hook(lambda mod, i, out, q=vq: q(out))
        done.append((name, "projection"))
    return done
