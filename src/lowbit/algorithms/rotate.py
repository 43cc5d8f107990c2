"""The ``rotate`` recipe step: QuaRot's rotations (R1, R2, R3, R4) and MR-GPTQ's block
rotation, so that activations lose their outlier channels before they are quantized.

* R1 ``[hidden, hidden]``: the residual stream. Every norm feeding linears is folded into
  them (:func:`~lowbit.algorithms.rotate_layout.fold_norms`), then the embedding
  (``E <- E @ R1``), every reader (input side), every writer (output side, biases too) and
  the LM head (input side) are rotated offline; a tied LM head is untied first. Gemma-2/3's
  sandwich post-norms keep their writers unrotated and rotate their own output online.
* R2 ``[head_dim, head_dim]``: per head, ``v_proj``'s output and ``o_proj``'s input,
  offline.
* R4 ``[inter, inter]``: ``down_proj``'s input, offline ``W @ R4`` plus the online
  ``input_rotation``.
* R3 ``[head_dim, head_dim]``: queries and keys after RoPE (online ``qk_rotation`` on each
  attention module), for a quantized KV cache.
* ``block``: every selected quantized linear's input gets a block-diagonal rotation of the
  group size (``W <- W @ blockdiag(B)`` and an online ``input_rotation``), composed with R4
  on ``down_proj`` into one full-width ``"matrix"`` rotation.

The float model computes the same function (tests/algorithms/test_rotate.py). The step is a
model step: it runs after the quantizers are inserted and before the block steps (GPTQ, AWQ,
SmoothQuant then see rotated weights), and refuses a model whose quantizers already hold
calibrated statistics or fixed scales. Online rotations are :mod:`lowbit.nn.rotation`'s.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lowbit.algorithms.rotate_layout import (RotationLayout, check_folded, fold_norms,
                                             rotate_input, rotate_output, rotation_layout)
from lowbit.errors import ConfigError
from lowbit.pipeline.algorithms import register_algorithm

ROTATE_ARGS = {"r1": True, "r2": True, "r3": False, "r4": True, "block": None,
               "kind": "hadamard", "seed": 0, "head_kind": None}
"""Arguments of the ``rotate`` step and their defaults (``kind``: one of
``lowbit.core.rotation.ROTATION_KINDS`` for R1/R4/block, and R2/R3 unless ``head_kind``;
``block``: the group size of the MR-GPTQ block rotation, None: off)."""

__all__ = ["ROTATE_ARGS", "RotationLayout", "apply_rotations", "fold_norms", "rotate_step",
           "rotation_layout"]


def _online(matrix: torch.Tensor, spec: dict, size: int, block: int | None = None):
    from lowbit.nn.rotation import OnlineRotation

    return OnlineRotation(matrix.detach().to(torch.float32).clone(), kind=spec.get("kind",
                          "matrix"), size=size, seed=spec.get("seed"), block=block)


def _attach(model: nn.Module, name: str, where: str, rot) -> None:
    from lowbit.nn.rotation import attach_rotation

    m = model.get_submodule(name)
    attr = {"input": "input_rotation", "qk": "qk_rotation",
            "norm_output": "output_rotation"}[where]
    if m._modules.get(attr) is not None:
        raise ConfigError(f"rotate: {name} already has an online {attr}: the model was rotated "
                          "before (rotate once, on the float weights)")
    t = next(iter(m.parameters()), None)
    if t is None:
        t = next(iter(m.buffers()), None)
    if t is not None:  # the matrix lives where the module computes (CUDA...)
        rot = rot.to(t.device)
    attach_rotation(model, name, where, rot)


def _check_matrix(name: str, r: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if r is None:
        return None
    if r.dim() != 2 or tuple(r.shape) != (n, n):
        raise ConfigError(f"rotate: {name} must be [{n}, {n}], got {tuple(r.shape)}")
    r = r.detach().double()
    err = float((r @ r.T - torch.eye(n, dtype=r.dtype, device=r.device)).abs().max())
    if not err <= 1e-5:
        raise ConfigError(f"rotate: {name} is not orthogonal (max |R R^T - I| = {err:.2g})")
    return r


def _quantized(m: nn.Module) -> bool:
    from lowbit.nn.modules import QuantMixin

    return isinstance(m, QuantMixin)


def default_block_linears(model: nn.Module, layout: RotationLayout) -> list[str]:
    """The block rotation's default selection: the ``nn.Linear`` s of the decoder blocks and
    the LM head whose weight or input quantizer is enabled (a multimodal model's other
    towers are not rotated)."""
    prefixes = tuple(f"{b.prefix}." for b in layout.blocks)
    return [n for n, m in model.named_modules() if _quantized(m) and isinstance(m, nn.Linear)
            and (m.weight_quantizer.is_enabled or m.input_quantizer.is_enabled)
            and (n.startswith(prefixes) or n == layout.lm_head)]


def check_plan(model: nn.Module, layout: RotationLayout, r1: bool, r3: bool, r4: bool,
               block: int | None, chosen: set[str]) -> None:
    """Every check of :func:`apply_rotations` that can fail, run before anything changes:
    R4 and block need quantized linears (their online rotations live there), a block size
    must divide each chosen linear's inputs, R3 needs attention modules, and no module may
    hold an online rotation already. ``chosen``: the block rotation's linears."""
    from lowbit.adapters.facts import attention_modules

    get = model.get_submodule
    places = []
    if r1:
        places += [(n, "output_rotation") for b in layout.blocks for n in b.post_norms.values()]
    if r3:
        attn = attention_modules(model)
        if not attn:
            raise ConfigError("rotate: r3 needs attention modules; the model's adapter "
                              "declares none")
        places += [(n, "qk_rotation") for n, _ in attn]
    downs = [b.down_proj for b in layout.blocks] if r4 else []
    for n in [*downs, *sorted(chosen)]:
        m = get(n)
        if not _quantized(m) or not isinstance(m, nn.Linear):
            raise ConfigError(f"rotate: {'r4' if n in downs else 'block'} needs {n} to be a "
                              "quantized linear (its online rotation lives there); quantize it "
                              f"or turn {'r4' if n in downs else 'block'} off")
        if block is not None and n in chosen and m.weight.shape[1] % block:
            raise ConfigError(f"rotate: block {block} does not divide {n}'s "
                              f"{m.weight.shape[1]} inputs")
        places.append((n, "input_rotation"))
    for n, attr in places:
        if get(n)._modules.get(attr) is not None:
            raise ConfigError(f"rotate: {n} already has an online {attr}: the model was "
                              "rotated before (rotate once, on the float weights)")


@torch.no_grad()
def apply_rotations(model: nn.Module, layout: RotationLayout, r1: torch.Tensor | None = None,
                    r2: torch.Tensor | None = None, r4: torch.Tensor | None = None,
                    r3: torch.Tensor | None = None, block: torch.Tensor | None = None, *,
                    block_linears: list[str] | None = None,
                    specs: dict[str, dict] | None = None) -> dict:
    """Rotate ``model`` in place (matrices orthogonal, computed in float64) and attach the
    online rotations; the float function is unchanged.

    ``r1 [hidden, hidden]`` (norms must be folded first: :func:`fold_norms`), ``r2
    [head_dim, head_dim]``, ``r4 [inter, inter]``, ``r3 [head_dim, head_dim]``, ``block [b,
    b]`` (see the module doc). ``block_linears``: the linears that get the block rotation
    (default: every linear whose weight quantizer is enabled, :func:`default_block_linears`).
    ``specs``: ``{"r1"|"r3"|"r4"|"block": {"kind", "seed"}}`` recorded in the online
    rotations' specs (default kind ``"matrix"``, seed None). Returns ``{"input": n, "qk": n,
    "norm_output": n}``: online rotations attached per place, and ``"block_linears"``."""
    specs = specs or {}
    r1 = _check_matrix("r1", r1, layout.hidden)
    r2 = _check_matrix("r2", r2, layout.head_dim)
    r3 = _check_matrix("r3", r3, layout.head_dim)
    r4 = _check_matrix("r4", r4, layout.intermediate)
    if block is not None:
        b = int(block.shape[0]) if block.dim() == 2 else -1
        block = _check_matrix("block", block, b)
    counts = {"input": 0, "qk": 0, "norm_output": 0}
    get = model.get_submodule
    chosen = set()
    if block is not None:
        chosen = set(default_block_linears(model, layout) if block_linears is None
                     else block_linears)
    check_plan(model, layout, r1 is not None, r3 is not None, r4 is not None,
               None if block is None else int(block.shape[0]), chosen)
    if r1 is not None:
        check_folded(model, layout)
        emb = get(layout.embed).weight
        emb.copy_((emb.double() @ r1.to(emb.device)).to(emb.dtype))
        for p in layout.extra_inputs:
            w = model.get_parameter(p)
            w.copy_((w.double() @ r1.to(w.device)).to(w.dtype))
        for blk in layout.blocks:
            for _, readers in blk.readers:
                for n in readers:
                    rotate_input(get(n), r1, n)
            for w in blk.writers:
                if w in blk.post_norms:
                    _attach(model, blk.post_norms[w], "norm_output",
                            _online(r1, specs.get("r1", {}), layout.hidden))
                    counts["norm_output"] += 1
                else:
                    rotate_output(get(w), r1, w)
        rotate_input(get(layout.lm_head), r1, layout.lm_head)
    if r2 is not None:
        for blk in layout.blocks:
            rotate_output(get(blk.v_proj), r2, blk.v_proj, heads=layout.kv_heads,
                          rows=blk.v_rows)
            rotate_input(get(blk.o_proj), r2, blk.o_proj, heads=layout.heads)
    if r3 is not None:
        from lowbit.adapters.facts import attention_modules

        for name, _ in attention_modules(model):
            _attach(model, name, "qk", _online(r3, specs.get("r3", {}), layout.head_dim))
            counts["qk"] += 1
    downs = {blk.down_proj for blk in layout.blocks}
    if r4 is not None:
        for d in sorted(downs):
            rotate_input(get(d), r4, d)
    if block is not None:
        for n in sorted(chosen):  # block-diagonal: the same [b, b] on each b-wide slice
            m = get(n)
            rotate_input(m, block, n, heads=m.weight.shape[1] // block.shape[0])
    composed = None
    for n in sorted(chosen | (downs if r4 is not None else set())):
        if n in downs and r4 is not None:
            if n in chosen:
                if composed is None:  # R4 then the block rotation, one full-width matrix
                    b = block.shape[0]
                    composed = (r4.reshape(-1, layout.intermediate // b, b) @ block).reshape(
                        r4.shape)
                rot = _online(composed, {"kind": "matrix", "seed": None}, layout.intermediate)
            else:
                rot = _online(r4, specs.get("r4", {}), layout.intermediate)
        else:
            rot = _online(block, specs.get("block", {}), get(n).weight.shape[1],
                          block=block.shape[0])
        _attach(model, n, "input", rot)
        counts["input"] += 1
    counts["block_linears"] = len(chosen)
    return counts


def _check_args(args: dict) -> dict:
    from lowbit.core.rotation import ROTATION_KINDS

    for k in ("r1", "r2", "r3", "r4"):
        if not isinstance(args[k], bool):
            raise ConfigError(f"rotate: {k} must be true or false, got {args[k]!r}")
    b = args["block"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 2):
        raise ConfigError(f"rotate: block must be a group size >= 2 (16 for NVFP4, 32 for MX) "
                          f"or null, got {b!r}")
    if args["kind"] not in ROTATION_KINDS:
        raise ConfigError(f"rotate: kind must be one of {', '.join(ROTATION_KINDS)}, got "
                          f"{args['kind']!r}")
    if args["head_kind"] is not None and args["head_kind"] not in ROTATION_KINDS:
        raise ConfigError(f"rotate: head_kind must be one of {', '.join(ROTATION_KINDS)} or "
                          f"null, got {args['head_kind']!r}")
    if isinstance(args["seed"], bool) or not isinstance(args["seed"], int):
        raise ConfigError(f"rotate: seed must be an integer, got {args['seed']!r}")
    if not any(args[k] for k in ("r1", "r2", "r3", "r4")) and b is None:
        raise ConfigError("rotate: every rotation is off (r1, r2, r3, r4 false, block null)")
    return args


def check_uncalibrated(model: nn.Module, step: str = "rotate") -> None:
    """ConfigError when a quantizer of ``model`` already holds calibrated statistics
    (``amax``) or fixed scales (GPTQ, AWQ, imatrix): they describe the unrotated model."""
    from lowbit.nn.utils import quantizers

    for name, q in quantizers(model):
        if q.amax is not None or q.scale is not None:
            what = "a calibrated amax" if q.amax is not None else "fixed scales"
            raise ConfigError(f"{step}: quantizer {name} already has {what}, computed on the "
                              f"unrotated model; run {step} before calibration and the other "
                              "algorithm steps (first in the recipe's algorithms)")


def _matches(name: str, targets: list[str] | None) -> bool:
    from lowbit.config.recipe import match

    return not targets or any(match(p, name) for p in targets)


def rotate_step(model: nn.Module, step, forward_loop=None, report=None) -> dict:
    """The ``rotate`` model step (``step.args`` over :data:`ROTATE_ARGS`; ``step.targets``:
    patterns of the linears that get the block rotation, default every quantized one).
    Builds the matrices with :func:`lowbit.core.rotation.rotation_matrix`, folds the norms
    (when R1 is on), rotates (:func:`apply_rotations`) and records what it did in
    ``report.rotations`` (and ``model.lowbit_report.rotations``). ``forward_loop`` is not
    used (rotations need no data). Returns that record."""
    from lowbit.core.rotation import rotation_matrix

    args = _check_args({**ROTATE_ARGS, **dict(step.args)})
    check_uncalibrated(model)
    layout = rotation_layout(model)
    seed, kind = int(args["seed"]), args["kind"]
    head_kind = args["head_kind"] or kind
    kinds = {"r1": kind, "r2": head_kind, "r3": head_kind, "r4": kind, "block": kind}
    sizes = {"r1": layout.hidden, "r2": layout.head_dim, "r3": layout.head_dim,
             "r4": layout.intermediate, "block": args["block"]}
    on = [k for k in ("r1", "r2", "r3", "r4") if args[k]] + \
        (["block"] if args["block"] is not None else [])
    targets = getattr(step, "targets", None)
    block_linears = None
    if args["block"] is not None:
        block_linears = [n for n in default_block_linears(model, layout) if _matches(n, targets)]
    check_plan(model, layout, args["r1"], args["r3"], args["r4"], args["block"],
               set(block_linears or ()))
    mats = {k: rotation_matrix(kinds[k], sizes[k], seed=seed) for k in on}
    folded = fold_norms(model, layout) if args["r1"] else {"folded": 0, "untied": False}
    counts = apply_rotations(model, layout, mats.get("r1"), mats.get("r2"), mats.get("r4"),
                             mats.get("r3"), mats.get("block"), block_linears=block_linears,
                             specs={k: {"kind": kinds[k], "seed": seed} for k in on})
    info = {"args": dict(args), "family": layout.family,
            "sizes": {k: sizes[k] for k in on}, "kinds": {k: kinds[k] for k in on},
            "seeds": {k: seed for k in on}, "folded_norms": folded["folded"],
            "untied_lm_head": folded["untied"],
            "online": {k: counts[k] for k in ("input", "qk", "norm_output")},
            "block_linears": counts["block_linears"]}
    if folded["untied"]:
        warnings.warn(f"rotate: the LM head {layout.lm_head} was tied to {layout.embed}; it now "
                      "has its own (rotated) weight (config.tie_word_embeddings = False)",
                      stacklevel=2)
    for rep in {id(r): r for r in (report, getattr(model, "lowbit_report", None))
                if r is not None}.values():
        rep.rotations = info
    return info


register_algorithm("rotate", rotate_step, scope="model", args=ROTATE_ARGS)
