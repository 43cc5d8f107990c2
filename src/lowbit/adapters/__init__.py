"""Model specifics: where the decoder blocks are, which linears share an input, and which
norm (or linear) precedes them so that smoothing scales can be folded into it.

One small declarative :class:`Adapter` per family (:mod:`.llama`, :mod:`.gpt2`, :mod:`.opt`,
:mod:`.moe` for mixture-of-experts families),
registered by ``config.model_type``; any other model gets :data:`GENERIC`, which finds the
same facts by inspection (a forward pass of one block with hooks). Whether a norm scales by
``w`` or ``1 + w`` is measured by running it (:mod:`.norms`); an adapter may declare it too,
and a declaration the module does not follow is an error.

>>> from lowbit.adapters import get_adapter
>>> get_adapter(model).name                     # doctest: +SKIP
'llama'
"""

from __future__ import annotations

from torch import nn

from lowbit.adapters import gpt2, llama, moe, opt  # noqa: F401  (register the families)
from lowbit.adapters.base import (Adapter, InputGroup, in_features, is_linear, is_norm,
                                  out_features, register_adapter, registered)
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


def family(model: nn.Module) -> str:
    """Name of ``model``'s adapter (``"llama"``, ``"gpt2"``, ``"opt"``, ``"generic"``), or
    ``"unknown"``."""
    a = get_adapter(model)
    return a.name if a is not None else "unknown"


__all__ = ["Adapter", "GENERIC", "GenericAdapter", "InputGroup", "NORM_KINDS", "family",
           "find_blocks", "get_adapter", "groups_by_inspection", "in_features", "input_groups",
           "is_linear", "is_norm", "linear_pairs", "norm_kind", "norm_offset", "out_features",
           "register_adapter", "registered"]
