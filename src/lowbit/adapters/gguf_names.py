"""The llama.cpp (GGUF) tensor name of each weight matrix of a model, as lowbit's exporter names it.

>>> names = gguf_tensor_names(model)          # doctest: +SKIP
>>> names["model.layers.0.self_attn.v_proj"]  # doctest: +SKIP
GgufTensor(name='blk.0.attn_v.weight', n_cols=64, module='model.layers.0.self_attn.v_proj', ...)

The names come from the ``gguf`` package's ``TensorNameMap`` for the family's llama.cpp
architecture (:data:`lowbit.adapters.gguf_archs.GGUF_ARCHS`, MoE families
:data:`lowbit.adapters.moe_export.GGUF_MOE_ARCHS`), exactly as
:func:`lowbit.export.gguf._tensors` looks them up: the multimodal Gemma-3's text prefix mapped
to ``model.``; a split experts module's projections (``<experts>.E.down_proj``) all map to the
one stacked tensor ``blk.N.ffn_down_exps.weight``; the output embedding module to
``output.weight`` when the architecture's map has no name for it.

``n_cols`` is ggml's ``ne[0]`` of the tensor: the input width of the matrix (``in_features``;
for transformers' ``Conv1D`` weights stored ``[in, out]``, their first dimension).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.adapters.gguf_archs import GGUF_ARCHS
from lowbit.adapters.moe_export import GGUF_MOE_ARCHS
from lowbit.errors import ConfigError


@dataclass(frozen=True)
class GgufTensor:
    """One weight matrix as llama.cpp names it.

    ``module``: lowbit module name; ``name``: GGUF tensor name (``blk.0.attn_q.weight``);
    ``n_cols``: ggml ``ne[0]`` (input width); ``n_rows``: output width; ``expert``: the
    module is one expert of a stacked ``*_exps`` tensor."""

    module: str
    name: str
    n_cols: int
    n_rows: int
    expert: bool = False


def gguf_arch_name(model: nn.Module) -> str:
    """The ``gguf.MODEL_ARCH`` member name of ``model`` (``"LLAMA"``, ``"QWEN2MOE"``...);
    ConfigError naming the model type when lowbit writes no GGUF for it."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt is None:
        raise ConfigError("GGUF tensor names need a transformers causal LM (a model with "
                          ".config.model_type)")
    if _experts(model) or (mt in GGUF_MOE_ARCHS and mt not in GGUF_ARCHS):
        if mt not in GGUF_MOE_ARCHS:
            raise ConfigError(f"GGUF: MoE model type {mt!r} is not supported; expected one of "
                              f"{', '.join(GGUF_MOE_ARCHS)}")
        return GGUF_MOE_ARCHS[mt].arch
    if mt not in GGUF_ARCHS:
        raise ConfigError(f"GGUF: model type {mt!r} is not supported; expected one of "
                          f"{', '.join(list(GGUF_ARCHS) + list(GGUF_MOE_ARCHS))}")
    return GGUF_ARCHS[mt].arch


def _experts(model: nn.Module) -> dict:
    from lowbit.nn.experts import MoEExperts

    return {n: m for n, m in model.named_modules() if isinstance(m, MoEExperts)}


def _text_config(model: nn.Module):
    from lowbit.adapters.facts import text_config

    return text_config(model)


def gguf_tensor_names(model: nn.Module) -> dict[str, GgufTensor]:
    """``{module name: GgufTensor}`` for every module with a 2-D ``weight`` that the GGUF
    export writes as a matrix (linears, ``Conv1D``, the token embedding, the output layer,
    split experts), in the model's module order. Modules of towers llama.cpp reads from a
    separate mmproj file are left out; a matrix with no llama.cpp name is a ConfigError."""
    import gguf

    mt = model.config.model_type
    arch_name = gguf_arch_name(model)
    dense = GGUF_ARCHS.get(mt)
    text_prefix = dense.text_prefix if dense is not None else None
    towers = dense.other_towers if dense is not None else ()
    transposed = dense.transposed if dense is not None else ()
    n_layers = _text_config(model).num_hidden_layers
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), n_layers)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    experts = _experts(model)
    out: dict[str, GgufTensor] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or any(
                name.startswith(p) for p in towers):
            continue
        ex = next((p for p in experts if name.startswith(p + ".")), None)
        if ex is not None:
            role = name.rsplit(".", 1)[-1]
            gname = tmap.get_name(f"{ex}.{role}.weight", try_suffixes=(".weight",))
            if gname is None:
                raise ConfigError(f"GGUF: no llama.cpp tensor name for the experts "
                                  f"{ex}.*.{role}")
            out[name] = GgufTensor(name, gname, int(w.shape[1]), int(w.shape[0]), True)
            continue
        hf = name
        if text_prefix is not None and name.startswith(text_prefix):
            hf = "model." + name[len(text_prefix):]
        gname = tmap.get_name(hf + ".weight", try_suffixes=(".weight",))
        if gname is None and m is head:
            gname = "output.weight"
        if gname is None:
            if "norm" in name.rsplit(".", 1)[-1]:
                continue
            raise ConfigError(f"GGUF: no llama.cpp tensor name for {name}.weight "
                              f"(architecture {arch_name.lower()})")
        t = (hf + ".weight").endswith(transposed) if transposed else False
        cols, rows = (w.shape[0], w.shape[1]) if t else (w.shape[1], w.shape[0])
        out[name] = GgufTensor(name, gname, int(cols), int(rows))
    return out


__all__ = ["GgufTensor", "gguf_arch_name", "gguf_tensor_names"]
