"""The residual stream's layout for rotations, norm folding, and the in-place weight edits.

:func:`rotation_layout` reads the family's facts (:func:`lowbit.adapters.facts.rotation`,
the adapter's ``groups``) into a :class:`RotationLayout` of full module names;
:func:`fold_norms` makes every norm that feeds linears (and the final norm) an identity
scale, its weight folded into the readers' input columns, so that a rotation of the hidden
space commutes with it. The helpers ``rotate_input`` / ``rotate_output`` edit weights in
place in float64 (conventions of the design contract: a linear computes ``y = x @ W.T``,
``W [out, in]``; rotating its input side by ``R`` is ``W <- W @ R``, its output side
``W <- R.T @ W``, ``b <- b @ R``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.errors import ConfigError


@dataclass
class BlockRotation:
    """One decoder block's part of a :class:`RotationLayout` (full module names).

    ``readers``: ``(norm or None, [linears reading its output])``; ``writers``: linears whose
    outputs are added to the residual stream; ``post_norms``: ``{writer: norm}`` for the
    writers behind a sandwich norm (they stay unrotated, the norm's output is rotated
    online); ``v_proj``/``v_rows``: the value projection and the rows of its value part
    (None: all rows; a slice for a fused ``qkv_proj``); ``o_proj``, ``down_proj``,
    ``attention`` (None when the block has none)."""

    prefix: str
    readers: list[tuple[str | None, list[str]]]
    writers: list[str]
    post_norms: dict[str, str]
    v_proj: str
    v_rows: slice | None
    o_proj: str
    down_proj: str
    attention: str | None


@dataclass
class RotationLayout:
    """Where the residual stream of a model enters, is written and leaves (full names).

    ``hidden``: residual width (R1 size); ``head_dim``, ``heads``, ``kv_heads`` (R2/R3);
    ``intermediate``: ``down_proj``'s input width (R4); ``norm_offset``: 0 (norms scale by
    ``w``) or 1 (``1 + w``); ``tied``: the LM head shared the embedding's weight when the
    layout was read; ``extra_inputs``: parameters ``P [*, hidden]`` feeding the stream."""

    family: str
    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    intermediate: int
    embed: str
    lm_head: str
    final_norm: str
    norm_offset: float
    tied: bool
    blocks: list[BlockRotation] = field(default_factory=list)
    extra_inputs: list[str] = field(default_factory=list)


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _mod(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"rotate: {type(model).__name__} has no {what} {name!r} (declared "
                          "by its adapter's rotation facts)") from None


def _weight(m: nn.Module, name: str) -> torch.Tensor:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or getattr(m, "weight_transposed", False) \
            or type(m).__name__ == "Conv1D":
        raise ConfigError(f"rotate: {name} ({type(m).__name__}) has no [out, in] weight")
    return w


@functools.lru_cache(maxsize=4)
def _probe(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded input ``[2, 3, c]`` and a random orthogonal ``[c, c]`` (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, c, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    return x, q


def _check_invariant(norm: nn.Module, name: str, offset: float) -> None:
    """ConfigError unless ``norm`` with an identity scale commutes with a rotation of its
    channels (RMSNorm does; LayerNorm, which subtracts the mean, does not)."""
    w = norm.weight
    c = w.numel()
    x, q = _probe(c)
    x, q = x.to(w.device), q.to(w.device)
    saved = w.detach().clone()
    b = getattr(norm, "bias", None)
    saved_b = b.detach().clone() if isinstance(b, torch.Tensor) else None
    try:
        with torch.no_grad():
            w.fill_(1.0 - offset)
            if saved_b is not None:
                b.zero_()
            y1 = norm(x.to(w.dtype)).double()
            y2 = norm((x @ q).to(w.dtype)).double()
    finally:
        with torch.no_grad():
            w.copy_(saved)
            if saved_b is not None:
                b.copy_(saved_b)
    err = float((y2 - y1 @ q).norm() / y1.norm())
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if not err <= tol:
        raise ConfigError(f"rotate: norm {name} ({type(norm).__name__}) does not commute with a "
                          f"rotation of its channels (relative error {err:.2g}): it cannot be "
                          "folded for a residual rotation")
    if saved_b is not None and bool(saved_b.abs().max() > 0):
        raise ConfigError(f"rotate: norm {name} ({type(norm).__name__}) has a bias: it cannot "
                          "be folded for a residual rotation")


def rotation_layout(model: nn.Module) -> RotationLayout:
    """The :class:`RotationLayout` of ``model`` from its adapter's facts.

    :class:`ConfigError` for a family without one (names the family and what blocks it:
    GPT-2/OPT's LayerNorm, OLMo-2's post-norms, a model without an adapter), a model
    without an LM head, a declared module missing, or a norm that does not commute with a
    rotation (checked by running it)."""
    from lowbit.adapters import get_adapter
    from lowbit.adapters import facts as F
    from lowbit.adapters.base import in_features

    a = get_adapter(model)
    facts = F.rotation(model)  # raises for a family without a layout
    found = a.find_blocks(model)
    if found is None:
        raise ConfigError(f"rotate: {type(model).__name__}: no decoder blocks found")
    prefix, blocks = found
    base = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    cfg = F.text_config(model)
    hidden = int(cfg.hidden_size)
    hd = F.head_dim(cfg)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    embed = _join(base, facts.embed)
    final_norm = _join(base, facts.final_norm)
    head = _mod(model, facts.lm_head, "LM head")
    emb = _mod(model, embed, "embedding")
    _mod(model, final_norm, "final norm")
    if _weight(emb, embed).shape[1] != hidden or _weight(head, facts.lm_head).shape[1] != hidden:
        raise ConfigError(f"rotate: {embed} or {facts.lm_head} is not {hidden} wide (the "
                          "config's hidden_size)")
    offset = F.norm_offset(model, measure=True)
    out = RotationLayout(family=a.name, hidden=hidden, head_dim=hd, heads=heads, kv_heads=kv,
                         intermediate=0, embed=embed, lm_head=facts.lm_head,
                         final_norm=final_norm, norm_offset=offset,
                         tied=head.weight is emb.weight)
    for p in facts.extra_inputs:
        try:
            w = model.get_parameter(p)
        except AttributeError:
            continue  # e.g. the multimodal class without its projector
        if w.dim() != 2 or w.shape[1] != hidden:
            raise ConfigError(f"rotate: {p} is {tuple(w.shape)}, expected [*, {hidden}]")
        out.extra_inputs.append(p)
    post = dict(facts.post_norms)
    for i, b in enumerate(blocks):
        bp = f"{prefix}.{i}"
        readers = [(_join(bp, g.prev) if g.prev is not None else None,
                    [_join(bp, n) for n in [*g.linears, *g.readers]])
                   for g in a.input_groups(b)]
        if not readers:
            raise ConfigError(f"rotate: block {bp} has none of the declared input groups")
        for nm, _ in readers:
            if nm is not None:
                _check_invariant(model.get_submodule(nm), nm, offset)
        writers = [_join(bp, w) for w in facts.writers]
        for w in writers:
            _mod(model, w, "residual writer")
        pn = {}
        for w, n in post.items():
            if _join(bp, w) in writers:
                _mod(model, _join(bp, n), "post-norm")
                pn[_join(bp, w)] = _join(bp, n)
        v, rows = facts.v_proj, None
        if ":" in v:
            v, part = v.split(":", 1)
            parts = dict(a.fused_parts(b, v))
            if part not in parts:
                raise ConfigError(f"rotate: {bp}.{v} has no part {part!r}")
            rows = parts[part]
        v = _join(bp, v)
        _mod(model, v, "value projection")
        down = _join(bp, facts.down_proj)
        out.intermediate = in_features(_mod(model, down, "down projection"))
        attn = _join(bp, a.attention)
        try:
            model.get_submodule(attn)
        except AttributeError:
            attn = None
        out.blocks.append(BlockRotation(prefix=bp, readers=readers, writers=writers,
                                        post_norms=pn, v_proj=v, v_rows=rows,
                                        o_proj=_join(bp, facts.o_proj), down_proj=down,
                                        attention=attn))
    _check_invariant(model.get_submodule(final_norm), final_norm, offset)
    return out


def _invalidate(m: nn.Module) -> None:
    fn = getattr(m, "invalidate_weight_cache", None)
    if fn is not None:
        fn()


@torch.no_grad()
def scale_input(m: nn.Module, s: torch.Tensor, name: str = "") -> None:
    """``W <- W * s`` per input column (``s [in]``), in float64, cast back."""
    w = _weight(m, name)
    w.copy_((w.double() * s.double().to(w.device)).to(w.dtype))
    _invalidate(m)


@torch.no_grad()
def rotate_input(m: nn.Module, r: torch.Tensor, name: str = "", heads: int | None = None) \
        -> None:
    """Input side: ``W <- W @ R`` (``R [in, in]``), or per head when ``heads`` (``R
    [hd, hd]`` on each ``hd``-wide slice of the ``heads * hd`` inputs); float64, cast back."""
    w = _weight(m, name)
    r = r.double().to(w.device)
    w64 = w.double()
    if heads is not None:
        n_out, n_in = w64.shape
        if n_in != heads * r.shape[0]:
            raise ConfigError(f"rotate: {name} has {n_in} inputs, not {heads} heads of "
                              f"{r.shape[0]}")
        new = (w64.reshape(n_out, heads, -1) @ r).reshape(n_out, n_in)
    else:
        if w64.shape[1] != r.shape[0]:
            raise ConfigError(f"rotate: {name} has {w64.shape[1]} inputs, the rotation is "
                              f"{r.shape[0]} wide")
        new = w64 @ r
    w.copy_(new.to(w.dtype))
    _invalidate(m)


@torch.no_grad()
def rotate_output(m: nn.Module, r: torch.Tensor, name: str = "", heads: int | None = None,
                  rows: slice | None = None) -> None:
    """Output side: ``W <- R.T @ W``, ``b <- b @ R`` (``R [out, out]``), on the rows
    ``rows`` only when given (a fused projection's part), per head when ``heads`` (``R [hd,
    hd]`` on each head's ``hd`` rows); float64, cast back."""
    w = _weight(m, name)
    rows = rows if rows is not None else slice(0, w.shape[0])
    r = r.double().to(w.device)
    hd = r.shape[0]
    part = w[rows].double()
    n = part.shape[0] // hd if heads is not None else 1
    if part.shape[0] != n * hd:
        raise ConfigError(f"rotate: {name} has {part.shape[0]} output rows, not "
                          f"{'heads of ' if heads else ''}{hd}")
    w[rows] = (r.T @ part.reshape(n, hd, -1)).reshape(part.shape).to(w.dtype)
    b = getattr(m, "bias", None)
    if isinstance(b, torch.Tensor):
        bp = b[rows].double()
        b[rows] = (bp.reshape(n, hd) @ r).reshape(-1).to(b.dtype)
    _invalidate(m)


def _norm_scale(norm: nn.Module, offset: float) -> torch.Tensor:
    return norm.weight.detach().double() + offset


def untie_head(model: nn.Module, layout: RotationLayout) -> bool:
    """Give the LM head its own weight when it shares the embedding's (a new Parameter,
    ``tie_word_embeddings = False`` in the configs). Returns whether it was tied."""
    head = model.get_submodule(layout.lm_head)
    emb = model.get_submodule(layout.embed)
    if head.weight is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone(),
                               requires_grad=emb.weight.requires_grad)
    from lowbit.adapters.facts import text_config

    for cfg in {id(c): c for c in (getattr(model, "config", None), text_config(model))
                if c is not None}.values():
        cfg.tie_word_embeddings = False
    _invalidate(head)
    return True


@torch.no_grad()
def fold_norms(model: nn.Module, layout: RotationLayout) -> dict:
    """Fold every norm that feeds linears (each block's ``readers``, and the final norm
    into the LM head) into its readers' input columns: readers ``W <- W * (offset + w)``,
    norm ``w <- 1 - offset`` (1 for ``w`` norms, 0 for ``1 + w``), so each norm is a pure
    normalisation and commutes with a rotation. The float function is unchanged. A tied LM
    head is untied first (:func:`untie_head`). Sandwich post-norms are not folded (their
    writers stay unrotated). Returns ``{"folded": n norms, "untied": bool}``."""
    untied = untie_head(model, layout)
    n = 0
    groups = [g for b in layout.blocks for g in b.readers] + \
        [(layout.final_norm, [layout.lm_head])]
    for norm_name, readers in groups:
        if norm_name is None:
            continue
        norm = model.get_submodule(norm_name)
        s = _norm_scale(norm, layout.norm_offset)
        for r in readers:
            scale_input(model.get_submodule(r), s, r)
        norm.weight.fill_(1.0 - layout.norm_offset)
        n += 1
    return {"folded": n, "untied": untied}


def check_folded(model: nn.Module, layout: RotationLayout) -> None:
    """ConfigError unless every norm :func:`fold_norms` folds has an identity scale."""
    names = [g[0] for b in layout.blocks for g in b.readers if g[0] is not None]
    for nm in [*names, layout.final_norm]:
        w = model.get_submodule(nm).weight
        if not bool((w.detach().double() + layout.norm_offset - 1.0).abs().max() == 0):
            raise ConfigError(f"rotate: norm {nm} still has a per-channel scale: call "
                              "fold_norms(model, layout) before rotating the residual stream")
