"""Which families' MoE experts lowbit knows, and how each stores them.

transformers 5 keeps the routed experts of an MoE block in one ``*Experts`` module with
3-D parameters. Each family's storage is declared here once (:data:`LAYOUTS`, keyed by the
experts class), checked against transformers' own declaration of it (the
``is_transposed`` / ``is_concatenated`` / ``has_bias`` / ``has_gate`` flags its
``use_experts_implementation`` decorator sets; ``tests/adapters/test_experts.py``) and by
running each family's tiny model before and after the split.

:func:`unfuse_experts` replaces every experts module of a model by a
:class:`lowbit.nn.experts.MoEExperts` (one ``nn.Linear`` MLP per expert) so that recipes
quantize the experts like any linear. An experts module of a class not declared here is
refused by name (a ConfigError), never left in float quietly.
"""

from __future__ import annotations

from torch import nn

from lowbit.errors import ConfigError
from lowbit.nn.experts import ExpertsLayout, MoEExperts
from lowbit.nn.routers import moe_blocks

_STD = ExpertsLayout()  # gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I]

#: experts class name -> how it stores its weights
LAYOUTS: dict[str, ExpertsLayout] = {
    "MixtralExperts": _STD,
    "Qwen2MoeExperts": _STD,
    "Qwen3MoeExperts": _STD,
    "OlmoeExperts": _STD,
    "FlexOlmoExperts": _STD,
    "DeepseekV2Experts": _STD,
    "DeepseekV3Experts": _STD,
    "Glm4MoeExperts": _STD,
    "PhimoeExperts": _STD,
    "MiniMaxExperts": _STD,
    "GraniteMoeExperts": _STD,
    "Ernie4_5_MoeExperts": _STD,
    "Dots1Experts": _STD,
    "HunYuanMoEV1Experts": _STD,
    # gpt-oss: gate_up_proj [E, H, 2I] with gate/up interleaved, biases, clamped SwiGLU
    "GptOssExperts": ExpertsLayout(transposed=True, concatenated=False, bias=True,
                                   gate_fn="_apply_gate"),
}


def layout_of(module: nn.Module, name: str = "experts") -> ExpertsLayout:
    """The declared layout of ``module``'s class; ConfigError naming the class when lowbit
    does not know it."""
    cls = type(module).__name__
    lay = LAYOUTS.get(cls)
    if lay is None:
        raise ConfigError(f"{name}: MoE experts class {cls} has no layout declared in "
                          "lowbit.adapters.experts, so its experts cannot be quantized; known: "
                          f"{', '.join(sorted(LAYOUTS))}")
    return lay


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every experts module still holding stacked 3-D parameters."""
    out = {}
    for block, (child, _) in moe_blocks(model).items():
        name = f"{block}.{child}" if block else child
        m = model.get_submodule(name)
        if not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            out[name] = m
    return out


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every stacked experts module of ``model`` by a
    :class:`~lowbit.nn.experts.MoEExperts` in place; returns the names replaced.

    Every module is checked before the first one changes: an unknown experts class is a
    ConfigError and leaves the model as it was. Meta tensors are fine (nothing is computed).
    """
    todo = fused_experts(model)
    layouts = {name: layout_of(m, name) for name, m in todo.items()}
    for name, m in todo.items():
        params = {n for n, _ in m.named_parameters(recurse=False)}
        if set(layouts[name].param_names()) != params:
            raise ConfigError(f"{name} ({type(m).__name__}): parameters {sorted(params)} do "
                              f"not match its declared layout {layouts[name].param_names()}")
    for name, m in todo.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoEExperts.from_fused(m, layouts[name], name))
    return list(todo)


__all__ = ["LAYOUTS", "fused_experts", "layout_of", "unfuse_experts"]
