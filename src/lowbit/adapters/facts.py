"""A family's facts, declared once in its adapter and read here by every other layer.

Export (GGUF), the runtime (FastDecoder) and the pipeline ask these functions instead of
testing ``model_type`` or class names themselves:

* :func:`text_config`: the config that describes the decoder blocks (``config.text_config``
  in Gemma-3's multimodal class, else ``config``);
* :func:`head_dim`, :func:`rotary_dim`: per-head width, and how many of its dimensions the
  rotary embedding turns (``partial_rotary_factor``: Phi-3 variants, ...);
* :func:`norm_offset`: the offset the family's norms add to their weight (0 for ``w``, 1 for
  ``1 + w``: Gemma), as declared (:func:`lowbit.adapters.norm_kind` measures a module);
* :func:`scalars`: embedding scale, residual / attention / logits multipliers, soft-caps;
* :func:`fused` (re-exported as :func:`lowbit.adapters.fused_projections`): fused linears;
* :func:`unreached_modules`: submodules that text-only calibration never runs (the vision
  tower and projector of a multimodal model), with a one-line reason each;
* :func:`attention_modules`: each decoder block's attention module (KV cache);
* :func:`rotation`: the residual stream's layout for rotations (:class:`RotationFacts`), or
  a :class:`~lowbit.errors.ConfigError` naming the family and what blocks it;
* :func:`mlp_matrices`, :func:`ties_by_default`: what a ``config.json`` alone says (keyed
  on ``model_type``, for the memory estimator, which has no model);
* :func:`ignored_config`: config fields set on the model that its family's forward does not
  apply (Gemma-3's ``attn_logit_softcapping``; the multimodal class's
  ``final_logit_softcapping``): a consumer that would apply them must refuse instead.
"""

from __future__ import annotations

import math

from torch import nn

from lowbit.adapters.norms import NORM_KINDS

DEFAULT_SCALARS = {
    "embedding_scale": 1.0,       # input embeddings are multiplied by it
    "residual_multiplier": 1.0,   # each block's attention / MLP output, before the residual add
    "attention_scale": None,      # query-key scale; None: head_dim ** -0.5
    "logits_scale": 1.0,          # final logits are multiplied by it
    "attn_logit_softcap": None,   # tanh soft-cap of attention scores (Gemma-2)
    "final_logit_softcap": None,  # tanh soft-cap of the final logits (Gemma-2)
}
"""Keys of :func:`scalars` and the value of a family that declares none."""


def _adapter(model: nn.Module):
    from lowbit.adapters import get_adapter

    return get_adapter(model)


def text_config(model: nn.Module):
    """The config of ``model``'s decoder blocks: the adapter's ``text_config`` attribute of
    ``model.config`` (multimodal classes), else ``model.config`` (None without one)."""
    cfg = getattr(model, "config", None)
    a = _adapter(model)
    if cfg is not None and a is not None and a.text_config:
        return getattr(cfg, a.text_config)
    return cfg


def head_dim(config) -> int:
    """``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    """Dimensions of each head that the rotary embedding turns: ``head_dim *
    partial_rotary_factor`` (from ``config.rope_parameters``, else the config attribute;
    1.0 when neither says; per layer type, Gemma-3's: the ``full_attention`` entry)."""
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp.get("full_attention"), dict):  # per layer type (Gemma-3): the global one
        rp = rp["full_attention"]
    f = rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int(head_dim(config) * (1.0 if f is None else float(f)))


def norm_offset(model: nn.Module, measure: bool = False) -> float | None:
    """0.0 (norms scale by ``w``) or 1.0 (``1 + w``) as ``model``'s family declares it; when
    the family does not declare it: None, or with ``measure`` the kind of the first norm of
    the first decoder block, by behaviour (:func:`lowbit.adapters.norm_offset`; a
    :class:`~lowbit.errors.ConfigError` when there is none)."""
    a = _adapter(model)
    if a is not None and a.norm is not None:
        return NORM_KINDS[a.norm]
    if not measure:
        return None
    from lowbit.adapters.base import is_norm
    from lowbit.adapters.norms import norm_offset as measured
    from lowbit.errors import ConfigError

    found = a.find_blocks(model) if a is not None else None
    norm = None if found is None else \
        next(((n, m) for n, m in found[1][0].named_modules() if is_norm(m)), None)
    if norm is None:
        raise ConfigError(f"{type(model).__name__}: its family declares no norm kind and no "
                          "norm was found in its first decoder block to measure")
    return measured(norm[1], name=f"{found[0]}.0.{norm[0]}")


def scalars(model: nn.Module) -> dict:
    """The family's scalars (keys of :data:`DEFAULT_SCALARS`), from :func:`text_config`:
    e.g. Gemma ``embedding_scale = sqrt(hidden_size)``; Granite its embedding, residual and
    attention multipliers and ``logits_scale = 1 / logits_scaling``. Values are the
    config's; a field the family's forward ignores is in :func:`ignored_config`."""
    out = dict(DEFAULT_SCALARS)
    a = _adapter(model)
    if a is not None and a.scalars is not None:
        out.update(a.scalars(text_config(model)))
    return out


def fused(model: nn.Module):
    """The family's fused projections (:class:`lowbit.adapters.Fused`), ``()`` if none."""
    a = _adapter(model)
    return a.fused if a is not None else ()


def unreached_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``[(module path, reason)]``: submodules of ``model`` outside its decoder blocks that
    calibration feeding text only never runs (Gemma-3's ``model.vision_tower`` and
    ``model.multi_modal_projector``). A recipe whose steps or static activation quantizers
    need data must exclude them (or quantize their weights without data) and say so."""
    a = _adapter(model)
    if a is None:
        return []
    out = []
    for path, reason in a.unreached:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        out.append((path, reason))
    return out


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(full name, module)]``: the attention module of each decoder block (the adapter's
    ``attention`` path, ``self_attn`` or GPT-2's ``attn``), in block order; ``[]`` for a
    model without a registered adapter (the generic one declares no layout)."""
    a = _adapter(model)
    from lowbit.adapters.generic import GenericAdapter

    if a is None or isinstance(a, GenericAdapter):
        return []
    found = a.find_blocks(model)
    if found is None:
        return []
    prefix, blocks = found
    out = []
    for i, b in enumerate(blocks):
        try:
            out.append((f"{prefix}.{i}.{a.attention}", b.get_submodule(a.attention)))
        except AttributeError:
            continue
    return out


def rotation(model: nn.Module):
    """The family's :class:`lowbit.adapters.base.RotationFacts` (embeddings, LM head, final
    norm, residual writers, sandwich post-norms, value/output and down projections).

    A :class:`~lowbit.errors.ConfigError` names the family and why when it declares none:
    the adapter's ``rotation_blocker``, else (GPT-2, OPT, a generic model) what the first
    decoder block shows: a ``LayerNorm`` subtracts the mean, which a rotation of the hidden
    space does not commute with."""
    from lowbit.errors import ConfigError

    a = _adapter(model)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if a is not None and a.rotation is not None:
        return a.rotation
    who = f"model type {mt!r}" + (f" (adapter {a.name})" if a is not None else "")
    if a is not None and a.rotation_blocker:
        why = a.rotation_blocker
    else:
        found = a.find_blocks(model) if a is not None else None
        ln = None if found is None else next(
            (n for n, m in found[1][0].named_modules() if isinstance(m, nn.LayerNorm)), None)
        if ln is not None:
            why = (f"its norms are LayerNorm ({found[0]}.0.{ln}), which subtracts the mean: "
                   "not invariant under a rotation of the hidden space")
        else:
            why = "its adapter declares no rotation layout (lowbit.adapters: Adapter.rotation)"
    raise ConfigError(f"rotate: {who} cannot be rotated: {why}")


def ignored_config(model: nn.Module) -> dict:
    """``{field: value}``: fields of :func:`text_config` that are set (not None) although the
    family's transformers forward does not apply them (declared in the adapter's
    ``ignores``); :func:`scalars` reports the config's values as they are, so a runtime or
    exporter that would apply one of these must refuse (or skip it, and say so)."""
    a = _adapter(model)
    cfg = text_config(model)
    if a is None or cfg is None:
        return {}
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return {f: getattr(cfg, f) for t, f in a.ignores
            if t in (None, mt) and getattr(cfg, f, None) is not None}


def unreached_patterns(model: nn.Module) -> list[str]:
    """Recipe ``exclude`` patterns (``"model.vision_tower*"``...) for
    :func:`unreached_modules`, e.g. ``recipes.load("int8-smoothquant", exclude=[*recipe.exclude,
    *unreached_patterns(model)])``."""
    return [f"{path}*" for path, _ in unreached_modules(model)]


#: ``config.model_type`` values whose MLP is two matrices (up, down; GELU/ReLU, no gate) and
#: whose configs tie the input embeddings to the LM head unless they say otherwise: the
#: GPT-2/OPT-style families (registered adapters: ``gpt2``, ``opt``; the others have none).
#: Read by tools that see a ``config.json`` without a model (:func:`mlp_matrices`,
#: :func:`ties_by_default`); tests check it against the registered adapters' MLP groups.
UNGATED_MLP_TYPES = ("gpt2", "opt", "gpt_neox", "gptj", "bloom", "falcon")


def mlp_matrices(model_type: str | None) -> int:
    """Weight matrices of one dense MLP for a ``config.model_type`` (no model needed): 2 for
    :data:`UNGATED_MLP_TYPES` (up, down), else 3 (gate, up, down: Llama's gated MLP)."""
    return 2 if model_type in UNGATED_MLP_TYPES else 3


def ties_by_default(model_type: str | None) -> bool:
    """Whether a config of ``model_type`` without ``tie_word_embeddings`` ties the LM head
    to the input embeddings (the GPT-2/OPT-style families: :data:`UNGATED_MLP_TYPES`)."""
    return model_type in UNGATED_MLP_TYPES


def gemma_scalars(config) -> dict:
    """Gemma 1-3: embeddings times ``sqrt(hidden_size)``, ``query_pre_attn_scalar ** -0.5``
    (when set), Gemma-2's soft-caps (when set)."""
    q = getattr(config, "query_pre_attn_scalar", None)
    return {"embedding_scale": math.sqrt(config.hidden_size),
            "attention_scale": None if q is None else float(q) ** -0.5,
            "attn_logit_softcap": getattr(config, "attn_logit_softcapping", None),
            "final_logit_softcap": getattr(config, "final_logit_softcapping", None)}


def granite_scalars(config) -> dict:
    """Granite: embedding, residual and attention multipliers; logits divided by
    ``logits_scaling``. Llama-like configs without them get the defaults."""
    out = {}
    for key, attr in (("embedding_scale", "embedding_multiplier"),
                      ("residual_multiplier", "residual_multiplier"),
                      ("attention_scale", "attention_multiplier")):
        v = getattr(config, attr, None)
        if v is not None:
            out[key] = float(v)
    ls = getattr(config, "logits_scaling", None)
    if ls is not None:
        out["logits_scale"] = 1.0 / float(ls)
    return out
