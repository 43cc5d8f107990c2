"""The adapter contract: what a quantization algorithm needs to know about a model family.

An :class:`Adapter` is declarative: the attribute path of the decoder blocks, the groups of
linears that read one input with the norm that produces it (``input_layernorm -> q/k/v``),
and the linear -> linear pairs across which a per-channel scale can be folded
(``v_proj -> o_proj``, ``up_proj -> down_proj``). One adapter per family, registered by
``model_type``; :mod:`lowbit.adapters.generic` finds the same facts by inspection for any
other model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowbit.adapters.norms import NORM_KINDS
from lowbit.errors import ConfigError
from lowbit.nn.modules import QuantMixin


@dataclass
class InputGroup:
    """Linears that read the same input, and the module that produced it (norm or linear).

    ``linears``: names inside the block, in execution order. ``prev``: the module that can
    absorb ``1/s`` (None when nothing can). ``prev_kind``: ``"norm"`` (its weight, and bias,
    are divided) or ``"linear"`` (its output rows are divided). ``norm``: how a ``"norm"``
    ``prev`` scales, as the family's adapter declares it (``"w"`` or ``"1+w"``; None: not
    declared); the fold measures it anyway (:func:`lowbit.adapters.norms.norm_kind`) and
    refuses a declaration the module does not follow.
    """

    linears: list[str]
    prev: str | None
    prev_kind: str = "norm"
    norm: str | None = None
    names: list[str] = field(default_factory=list)
    # modules that read ``prev``'s output too but stay float (MoE routers, shared-expert
    # gates): a scale folded into ``prev`` is multiplied into their weight columns, so that
    # their outputs do not change
    readers: list[str] = field(default_factory=list)
    # for a linear ``prev`` with fewer outputs than the group has inputs (grouped-query
    # attention's v_proj -> o_proj): the output channel of ``prev`` behind each input channel
    channel_map: torch.Tensor | None = None
    # a linear ``prev`` that is one part of a fused projection (Phi-3's ``qkv_proj`` value
    # rows, GPT-2's ``c_attn`` value columns): the part's name; ``channel_map`` then points
    # into that part's rows of the fused weight, and its other rows keep scale 1
    prev_part: str | None = None
    # the module whose output scores a candidate scale (AWQ, searched SmoothQuant); None:
    # :attr:`parent`'s default (a fused projection's group is scored on its attention or MLP)
    target: str | None = None

    def tie(self, v: torch.Tensor, reduce: str = "amax") -> torch.Tensor:
        """A per-input-channel vector made equal on channels fed by one output of ``prev``
        (``reduce``: ``"amax"`` or ``"mean"`` over them); unchanged without a channel map."""
        if self.channel_map is None:
            return v
        idx = self.channel_map.to(v.device)
        n = int(idx.max()) + 1
        r = torch.zeros(n, dtype=v.dtype, device=v.device).scatter_reduce(
            0, idx, v, reduce=reduce, include_self=False)
        return r[idx]

    @property
    def parent(self) -> str:
        """The smallest module of the block holding every linear of the group (``self_attn``
        for q/k/v, ``mlp`` for gate/up, the linear itself for a group of one), or the declared
        :attr:`target` (a fused ``qkv_proj``'s group is scored on ``self_attn``)."""
        if self.target is not None:
            return self.target
        if len(self.linears) == 1:
            return self.linears[0]
        parts = [n.split(".") for n in self.linears]
        common = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        return ".".join(common)


def is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's linears, weight stored ``[in, out]``), not quantized."""
    return type(m).__name__ == "Conv1D" and not isinstance(m, QuantMixin)


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or their quantized classes (weights ``[out, in]``)."""
    if isinstance(m, QuantMixin):
        return not isinstance(m, (nn.Conv1d, nn.Conv2d))
    return type(m) is nn.Linear or is_conv1d(m)


def is_norm(m: nn.Module) -> bool:
    """LayerNorm or an RMSNorm-like module with a per-channel ``weight``."""
    if isinstance(m, nn.LayerNorm):
        return True
    return "Norm" in type(m).__name__ and isinstance(getattr(m, "weight", None), torch.Tensor) \
        and m.weight.dim() == 1




def in_features(m: nn.Module) -> int:
    """Input features of a linear-like module."""
    if isinstance(m, QuantMixin):
        return m.weight_2d().shape[1]
    if is_conv1d(m):
        return m.weight.shape[0]
    if isinstance(getattr(m, "in_features", None), int):  # nn.Linear, runtime's PackedLinear
        return m.in_features
    return m.weight.shape[1]


def out_features(m: nn.Module) -> int:
    """Output features of a linear-like module."""
    if isinstance(m, QuantMixin):
        return m.weight_2d().shape[0]
    if is_conv1d(m):
        return m.weight.shape[1]
    if isinstance(getattr(m, "out_features", None), int):  # nn.Linear, runtime's PackedLinear
        return m.out_features
    return m.weight.shape[0]


def gqa_channel_map(block: nn.Module, prev: str, nxt: str) -> torch.Tensor | None:
    """Input channel of an attention output projection -> output channel of the value
    projection behind it, for grouped-query attention (each key/value head serves
    ``num_key_value_groups`` query heads); None when the attention module does not say."""
    attn = _get(block, prev.rsplit(".", 1)[0]) if "." in prev else block
    hd = getattr(attn, "head_dim", None)
    rep = getattr(attn, "num_key_value_groups", None)
    if not isinstance(hd, int) or not isinstance(rep, int) or rep < 1:
        return None
    n_in = in_features(_get(block, nxt))
    c = torch.arange(n_in)
    head, d = c // hd, c % hd
    return (head // rep) * hd + d


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _wild(pattern: str) -> re.Pattern:
    """``mlp.experts.*.up_proj`` -> a regex where each ``*`` is one dotted part."""
    return re.compile("^" + r"([^.]+)".join(re.escape(p) for p in pattern.split("*")) + "$")


def expand(block: nn.Module, pattern: str) -> list[str]:
    """Names of ``block``'s submodules that ``pattern`` names: itself when it has no ``*``
    (if present), else every match with one dotted part per ``*`` (``mlp.experts.*.up_proj``
    -> ``mlp.experts.0.up_proj``, ...), in module order."""
    if "*" not in pattern:
        return [pattern] if _get(block, pattern) is not None else []
    rx = _wild(pattern)
    return [n for n, _ in block.named_modules() if n and rx.match(n)]


def block_config(block: nn.Module):
    """The transformers config that a decoder block's modules hold (``self_attn.config`` in
    Phi-3, GPT-2, Llama...: the text model's config, also inside a multimodal model), or
    None when no submodule keeps one."""
    for m in block.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "to_dict"):
            return c
    return None


@dataclass(frozen=True)
class Fused:
    """One linear that computes several projections in one matmul: Phi-3's
    ``self_attn.qkv_proj`` (``q, k, v``) and ``mlp.gate_up_proj`` (``gate, up``), GPT-2's
    ``attn.c_attn`` (``q, k, v``, a Conv1D).

    ``name``: the linear's path inside a decoder block. ``parts``: the projections' names in
    output order. ``sizes(config) -> [int, ...]``: output features of each part (from the
    text model's config: :func:`block_config`); they must add up to the linear's output
    features. ``target``: the module whose output scores a scale of the linear's input
    group (AWQ, searched SmoothQuant); default: the linear's parent (``self_attn``, ``mlp``).

    Slices index *output features*: rows of the ``[out, in]`` weight (``weight_2d``), i.e.
    columns of a Conv1D's stored ``[in, out]`` weight, and the last dimension of the output.
    """

    name: str
    parts: tuple[str, ...]
    sizes: Callable[[Any], "list[int]"]
    target: str | None = None

    def slices(self, config, module: nn.Module | None = None) -> list[tuple[str, slice]]:
        """``[(part, slice of output features), ...]`` in output order; checked against
        ``module``'s output features when given (a :class:`ConfigError` names the linear)."""
        if config is None:
            raise ConfigError(f"fused projection {self.name}: no model config to size its "
                              f"parts {', '.join(self.parts)}")
        sizes = [int(n) for n in self.sizes(config)]
        if len(sizes) != len(self.parts) or any(n <= 0 for n in sizes):
            raise ConfigError(f"fused projection {self.name}: sizes {sizes} do not give one "
                              f"positive size per part {self.parts}")
        if module is not None and sum(sizes) != out_features(module):
            raise ConfigError(f"fused projection {self.name}: parts {dict(zip(self.parts, sizes))}"
                              f" add up to {sum(sizes)} outputs, the module has "
                              f"{out_features(module)}")
        out, start = [], 0
        for p, n in zip(self.parts, sizes):
            out.append((p, slice(start, start + n)))
            start += n
        return out

    @property
    def scored_on(self) -> str:
        """:attr:`target`, or the linear's parent module."""
        return self.target or (self.name.rsplit(".", 1)[0] if "." in self.name else self.name)


@dataclass(frozen=True)
class RotationFacts:
    """Where a family's residual stream enters, is written and leaves: the facts a rotation
    of the hidden space (QuaRot's R1, per-head R2, R4 before ``down_proj``:
    :mod:`lowbit.algorithms.rotate`) needs beyond the adapter's ``groups`` (each norm and
    the linears reading it: their weights absorb the norm's scale, their inputs are
    rotated).

    ``embed`` and ``final_norm``: paths inside the module holding the decoder blocks' list
    (the base model: ``model``, or a multimodal Gemma-3's ``model.language_model``);
    ``lm_head``: path inside the whole model. The rest are paths inside a decoder block:
    ``writers``: the linears whose outputs are added to the residual stream (output side
    rotated); ``post_norms``: ``(writer, norm)`` where a norm with a per-channel weight sits
    between a writer and the residual add (Gemma-2/3's sandwich norms): that writer stays
    unrotated and the norm's output is rotated online; ``v_proj`` (``"name:part"`` for the
    value rows of a fused projection) and ``o_proj``: the per-head value/output pair (R2);
    ``down_proj``: the MLP's output projection (R4). ``extra_inputs``: paths inside the
    whole model of weight matrices ``P [*, hidden]`` whose product ``x @ P`` enters the
    residual stream beside the embeddings (a multimodal Gemma-3's image projection
    ``model.multi_modal_projector.mm_input_projection_weight``): rotated like an embedding.
    """

    embed: str = "embed_tokens"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    post_norms: tuple[tuple[str, str], ...] = ()
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    down_proj: str = "mlp.down_proj"
    extra_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one model family (see the module doc).

    ``blocks``: attribute paths where the ``nn.ModuleList`` of decoder blocks may be (the
    causal-LM model, and its base model). ``groups``:
    ``(norm, (linear, ...))`` pairs inside a block. ``pairs``: ``(prev linear, next linear)``
    inside a block; a pair is used where ``out(prev) == in(next)``, or where ``pair_map``
    maps each input channel of ``next`` to the output channel of ``prev`` behind it
    (grouped-query attention's ``v_proj -> o_proj``). ``model_types``: the
    ``config.model_type`` values it serves. ``accepts``: an extra check of the model (e.g.
    OPT's pre-norm layout). ``norm``: how the family's norms scale their normalised input,
    ``"w"`` (Llama's RMSNorm, LayerNorm) or ``"1+w"`` (Gemma, Qwen3-Next); None: found by
    behaviour only (:func:`lowbit.adapters.norms.norm_kind`, which also checks a
    declaration).

    Names in ``groups``, ``pairs`` and ``readers`` may hold ``*`` for one dotted part (the
    routed experts of an MoE block: ``mlp.experts.*.gate_proj``); a pair's ``*`` parts of
    ``next`` take the values matched in ``prev`` (``mlp.experts.*.up_proj ->
    mlp.experts.*.down_proj``, expert by expert). ``readers``: ``(norm, (module, ...))``:
    float modules that read the norm's output beside the group (MoE routers, shared-expert
    gates); a scale folded into the norm is multiplied into their weight columns
    (:attr:`InputGroup.readers`).

    ``text_config``, ``scalars``, ``unreached``, ``ignores``, ``attention`` (the attention
    module's path in a block, ``self_attn``; GPT-2: ``attn``): family facts, read through
    :mod:`lowbit.adapters.facts` (never guessed from class names elsewhere).
    ``rotation`` (:class:`RotationFacts`) / ``rotation_blocker``: the layout of the residual
    stream for rotations, or why the family has none.

    ``fused``: the block's fused projections (:class:`Fused`). A pair's ``prev`` may name
    one part of one, ``"self_attn.qkv_proj:v"``: the scale is folded into that part's rows
    only (its other rows keep 1), with ``pair_map`` mapping ``next``'s input channels to
    the part's rows where the sizes differ (grouped-query attention). Read them with
    :meth:`fused_parts` (or :func:`lowbit.adapters.fused_parts` for a model).
    """

    name: str
    model_types: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    accepts: Callable[[nn.Module], bool] | None = None
    pair_map: Callable[[nn.Module, str, str], "torch.Tensor | None"] | None = None
    norm: str | None = None
    readers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    fused: tuple[Fused, ...] = ()
    # family facts read through lowbit.adapters.facts (see there): the attribute path of the
    # config describing the blocks (``"text_config"`` in a multimodal model), the family's
    # scalars (embedding scale, multipliers, soft-caps) from that config, and the modules
    # that text-only calibration never runs, with why
    text_config: str | None = None
    scalars: Callable[[Any], dict] | None = None
    unreached: tuple[tuple[str, str], ...] = ()
    # ``(model_type or None for all, field)``: fields of the text config that the family's
    # transformers forward does not apply (Gemma-3's attention ignores
    # attn_logit_softcapping): lowbit.adapters.facts.ignored_config
    ignores: tuple[tuple[str | None, str], ...] = ()
    # the attention module's path inside a block (where the KV cache is computed)
    attention: str = "self_attn"
    # the layout rotations need (lowbit.algorithms.rotate), None: the family cannot be
    # rotated, ``rotation_blocker`` says why (read through lowbit.adapters.facts.rotation)
    rotation: RotationFacts | None = None
    rotation_blocker: str | None = None

    def __post_init__(self):
        if self.norm is not None and self.norm not in NORM_KINDS:
            raise ConfigError(f"adapter {self.name}: norm must be one of "
                              f"{', '.join(NORM_KINDS)} or None, got {self.norm!r}")

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter describes ``model`` (its model type, and its structure)."""
        cfg = getattr(model, "config", None)
        if getattr(cfg, "model_type", None) not in self.model_types:
            return False
        if self.accepts is not None and not self.accepts(model):
            return False
        found = self.find_blocks(model)
        if found is None:
            return False
        b = found[1][0]
        return all(_get(b, n) is not None for _, lins in self.groups for n in lins
                   if "*" not in n)

    def find_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList] | None:
        """``(path, ModuleList)`` of the decoder blocks, or None."""
        for prefix in self.blocks:
            m = _get(model, prefix)
            if isinstance(m, nn.ModuleList) and len(m):
                return prefix, m
        return None

    def fused_decl(self, name: str) -> Fused | None:
        """The declared :class:`Fused` projection at block path ``name``, or None."""
        return next((f for f in self.fused if f.name == name), None)

    def fused_parts(self, block: nn.Module, name: str, config=None) \
            -> list[tuple[str, slice]]:
        """``[(part, slice of output features), ...]`` of the fused linear ``name`` of
        ``block`` (e.g. ``"self_attn.qkv_proj"`` -> ``[("q", slice(0, 64)), ("k", slice(64,
        96)), ("v", slice(96, 128))]``), sized by ``config`` (default: the block's own,
        :func:`block_config`) and checked against the module. :class:`ConfigError` when the
        family declares no such fused projection or the block lacks it."""
        f = self.fused_decl(name)
        if f is None:
            known = ", ".join(x.name for x in self.fused) or "none"
            raise ConfigError(f"adapter {self.name}: {name!r} is not a declared fused "
                              f"projection (declared: {known})")
        m = _get(block, name)
        if m is None:
            raise ConfigError(f"adapter {self.name}: the block has no module {name!r}")
        return f.slices(config if config is not None else block_config(block), m)

    def input_groups(self, block: nn.Module, args: tuple = (), kwargs: dict | None = None) \
            -> list[InputGroup]:
        """The declared groups present in ``block`` (linears missing from it are dropped).
        A group that is one fused projection is scored on its :attr:`Fused.scored_on`."""
        out = []
        readers = dict(self.readers)
        for prev, lins in self.groups:
            present = [n for p in lins for n in expand(block, p)]
            if present:
                has_prev = _get(block, prev) is not None
                f = self.fused_decl(present[0]) if len(present) == 1 else None
                target = f.scored_on if f is not None and \
                    _get(block, f.scored_on) is not None else None
                out.append(InputGroup(linears=present, prev=prev if has_prev else None,
                                      norm=self.norm, target=target,
                                      readers=[n for p in readers.get(prev, ())
                                               for n in expand(block, p)] if has_prev
                                      else []))
        return out

    def linear_pairs(self, block: nn.Module) -> list[InputGroup]:
        """Declared ``prev -> next`` pairs whose shapes allow folding a scale across."""
        out = []
        for prev, nxt in self._expanded_pairs(block):
            if ":" in prev:
                g = self._part_pair(block, prev, nxt)
                if g is not None:
                    out.append(g)
                continue
            p, n = _get(block, prev), _get(block, nxt)
            if p is None or n is None:
                continue
            if out_features(p) == in_features(n):
                out.append(InputGroup(linears=[nxt], prev=prev, prev_kind="linear"))
            elif self.pair_map is not None:
                idx = self.pair_map(block, prev, nxt)
                if idx is not None and idx.numel() == in_features(n) and \
                        int(idx.max()) < out_features(p):
                    out.append(InputGroup(linears=[nxt], prev=prev, prev_kind="linear",
                                          channel_map=idx))
        return out

    def _part_pair(self, block: nn.Module, prev: str, nxt: str) -> InputGroup | None:
        """The pair ``fused:part -> next`` (see the class doc), or None when the block lacks
        either module or the shapes do not fit."""
        name, part = prev.split(":", 1)
        p, n = _get(block, name), _get(block, nxt)
        if p is None or n is None:
            return None
        parts = dict(self.fused_parts(block, name))
        if part not in parts:
            raise ConfigError(f"adapter {self.name}: pair {prev} -> {nxt}: {name} has no part "
                              f"{part!r} (parts: {', '.join(parts)})")
        sl = parts[part]
        size, n_in = sl.stop - sl.start, in_features(n)
        if size == n_in:
            idx = torch.arange(n_in)
        elif self.pair_map is not None:
            idx = self.pair_map(block, name, nxt)
            if idx is None or idx.numel() != n_in or int(idx.max()) >= size:
                return None
        else:
            return None
        return InputGroup(linears=[nxt], prev=name, prev_kind="linear",
                          channel_map=idx + sl.start, prev_part=part)

    def _expanded_pairs(self, block: nn.Module) -> list[tuple[str, str]]:
        """The declared pairs with their ``*`` parts expanded (see the class doc)."""
        out = []
        for prev, nxt in self.pairs:
            if "*" not in prev:
                out.append((prev, nxt))
                continue
            rx = _wild(prev)
            for name in expand(block, prev):
                parts = iter(rx.match(name).groups())
                out.append((name, re.sub(r"\*", lambda _: next(parts), nxt)))
        return out

    def scale_groups(self, block: nn.Module, args: tuple = (), kwargs: dict | None = None,
                     pairs: bool = True) -> list[InputGroup]:
        """Groups with a module that can absorb a scale, in execution order of the block:
        norm groups, then (``pairs``) each linear pair placed after its ``prev``'s group."""
        groups = [g for g in self.input_groups(block, args, kwargs) if g.prev is not None]
        if not pairs:
            return groups
        order = {n: i for i, (n, _) in enumerate(block.named_modules())}
        allg = groups + self.linear_pairs(block)

        def key(g):  # a pair comes after its prev's group even when next is declared first
            k = order.get(g.linears[0], 0)
            return max(k, order.get(g.prev, 0)) if g.prev_kind == "linear" else k
        return sorted(allg, key=key)


_REGISTRY: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` (replacing one of the same name); returns it."""
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != adapter.name]
    _REGISTRY.append(adapter)
    return adapter


def registered() -> list[Adapter]:
    """The registered (declarative) adapters."""
    return list(_REGISTRY)
