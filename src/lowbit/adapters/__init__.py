"""Model specifics: where the decoder blocks are, which linears share an input, and which
norm (or linear) precedes them so that smoothing scales can be folded into it.

One small declarative :class:`Adapter` per family (:mod:`.llama`, :mod:`.gpt2`, :mod:`.opt`,
:mod:`.phi3`, :mod:`.moe` for mixture-of-experts families),
registered by ``config.model_type``; any other model gets :data:`GENERIC`, which finds the
same facts by inspection (a forward pass of one block with hooks). Whether a norm scales by
``w`` or ``1 + w`` is measured by running it (:mod:`.norms`); an adapter may declare it too,
and a declaration the module does not follow is an error.

A family's other facts (fused projections, text config of a multimodal model, rotary
width, embedding scale and multipliers, soft-caps, modules text calibration never runs) are
declared in its adapter too and read through :mod:`.facts`; nothing else in lowbit should
test ``model_type`` or class names.

>>> from lowbit.adapters import get_adapter
>>> get_adapter(model).name                     # doctest: +SKIP
'llama'
"""

from __future__ import annotations

from torch import nn

from lowbit.adapters import facts  # noqa: F401  (family facts: lowbit.adapters.facts.*)
from lowbit.adapters import gpt2, llama, moe, opt, phi3  # noqa: F401  (register the families)
from lowbit.adapters.base import (Adapter, Fused, InputGroup, block_config, in_features,
                                  is_linear, is_norm, out_features, register_adapter,
                                  registered)
from lowbit.adapters.generic import GENERIC, GenericAdapter, groups_by_inspection
from lowbit.adapters.norms import NORM_KINDS, norm_kind, norm_offset


def get_adapter(model: nn.Module) -> Adapter | None:
    """The registered adapter of ``model``'s family, else :data:`GENERIC` when the model has
    decoder blocks, else None."""
    for a in registered():
        if a.matches(model):
            return a
    return GENERIC if GENERIC.matches(model) else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(path, ModuleList)`` of the decoder blocks of ``model``, or None."""
    a = get_adapter(model)
    return a.find_blocks(model) if a is not None else None


def input_groups(block: nn.Module, args: tuple, kwargs: dict) -> list[InputGroup]:
    """Linears sharing an input in ``block``, by inspection (see :mod:`.generic`)."""
    return groups_by_inspection(block, args, kwargs)


def linear_pairs(model: nn.Module, block: nn.Module) -> list[InputGroup]:
    """The ``prev -> next`` linear pairs of ``model``'s adapter that fit in ``block``."""
    a = get_adapter(model)
    return a.linear_pairs(block) if a is not None else []


def fused_projections(model: nn.Module) -> tuple[Fused, ...]:
    """The fused projections (:class:`Fused`: block path, parts, sizes) that ``model``'s
    family declares, e.g. Phi-3's ``self_attn.qkv_proj`` (q, k, v) and ``mlp.gate_up_proj``
    (gate, up); ``()`` for a family without any (or an unknown model)."""
    a = get_adapter(model)
    return a.fused if a is not None else ()


def fused_parts(model: nn.Module, block: nn.Module, name: str) -> list[tuple[str, slice]]:
    """``[(part, slice of output features), ...]`` of the fused linear ``name`` (a path in
    ``block``, one of ``model``'s decoder blocks), in output order.

    Slices index the rows of the ``[out, in]`` weight (a Conv1D's stored ``[in, out]``
    weight: its columns) and the last dimension of the linear's output. For a Phi-3 block
    with 4 heads, 2 key/value heads of 16: ``fused_parts(model, block,
    "self_attn.qkv_proj") == [("q", slice(0, 64)), ("k", slice(64, 96)), ("v", slice(96,
    128))]``; ``"mlp.gate_up_proj"`` -> ``[("gate", slice(0, I)), ("up", slice(I, 2I))]``.
    Raises :class:`~lowbit.errors.ConfigError` when the family declares no such fused
    projection, or the sizes do not add up to the module's outputs."""
    from lowbit.errors import ConfigError

    a = get_adapter(model)
    if a is None:
        raise ConfigError(f"{type(model).__name__}: no adapter (no decoder blocks), so no "
                          f"fused projection {name!r}")
    return a.fused_parts(block, name)


def family(model: nn.Module) -> str:
    """Name of ``model``'s adapter (``"llama"``, ``"gemma2"``, ``"phi3"``, ``"gpt2"``,
    ``"generic"``...), or
    ``"unknown"``."""
    a = get_adapter(model)
    return a.name if a is not None else "unknown"


__all__ = ["Adapter", "block_config", "facts", "family", "find_blocks", "Fused",
           "fused_parts", "fused_projections", "GENERIC", "GenericAdapter",
           "get_adapter", "groups_by_inspection", "in_features", "input_groups",
           "InputGroup", "is_linear", "is_norm", "linear_pairs", "norm_kind",
           "NORM_KINDS", "norm_offset", "out_features", "register_adapter", "registered"]
