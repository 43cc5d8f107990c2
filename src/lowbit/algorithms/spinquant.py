"""SpinQuant: learned rotations (R1, per-layer R2) trained on calibration data.

The ``spinquant`` model step (scope ``model``, runs after the quantizers are inserted and
before the block steps) does what the ``rotate`` step (:mod:`lowbit.algorithms.rotate`)
does, with the residual rotation R1 ``[hidden, hidden]`` and one value/output rotation R2
``[head_dim, head_dim]`` per layer *learned* instead of fixed:

1. the calibration batches of ``forward_loop`` are captured (the model's forward is
   replaced by a recorder: nothing runs); the first ``samples`` rows of token ids, each cut
   to ``seq_len`` tokens, are the training set;
2. the norms are folded (:func:`lowbit.algorithms.rotate.fold_norms`; a tied LM head is
   untied);
3. R1 and each R2 start from ``rotation_matrix(kind, ...)`` (Hadamard by default; R2 of
   layer ``i`` seeded ``seed + 1 + i``) and are trained with Cayley SGD on the orthogonal
   group (SpinQuant's optimiser ``SGDG`` without momentum, Li et al. 2020: the Riemannian
   gradient ``W = (R G^T - G R^T) / 2``, step ``a = min(lr, 1 / |W|_1)``, ``R <- (I - a/2
   W)^-1 (I + a/2 W) R``: orthogonal after every step up to rounding) to minimise the
   next-token cross-entropy of the **quantized** model on the captured rows. The forward is
   functional (:func:`torch.func.functional_call` with the rotated weights: readers of the
   residual ``W @ R1``, writers ``R1^T @ W``, LM head ``W @ R1``, extra inputs ``P @ R1``,
   the outputs of the embeddings and of sandwich post-norms ``@ R1`` (forward hooks),
   v_proj rows and o_proj columns per head with R2, down_proj ``W @ R4`` with its input
   rotated by R4 (a pre-hook), as the online rotation will); every weight is frozen and the
   gradient reaches R through the quantizers' straight-through estimators (weights and
   activations; scales computed from a tensor carry no gradient in ``lowbit.core``). Static
   activation quantizers (no ``amax`` yet: this step runs before calibration) use dynamic
   estimates from each input while training (the same spec with ``dynamic`` set) and are
   put back as they were, to be calibrated later on the rotated model. Each step uses all
   rows (``batch`` None) or ``batch`` of them in turn; the matrices kept are those of the
   lowest loss on all rows among the points measured (every step with ``batch`` None, the
   initial and final ones otherwise): never worse than the fixed rotation on these rows.
   The weights are fake-quantized once per step (straight-through), then the rows run in
   micro-batches of 2. R3 and the MR-GPTQ block rotation are not part of the training
   forward; they are applied at the end as the ``rotate`` step applies them;
4. the learned matrices are applied: R2 per layer (:func:`apply_r2`), then
   :func:`lowbit.algorithms.rotate.apply_rotations` with R1 (and R4, R3, block; an online
   R1 after a sandwich post-norm is recorded as kind ``"matrix"``).

The record (``report.rotations``, as the ``rotate`` step's) has a ``learned`` entry: loss
before/after, the loss at every step, the best step, seconds.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.utils import quantizers
from lowbit.pipeline.algorithms import register_algorithm

SPINQUANT_ARGS = {"steps": 20, "lr": 1.5, "samples": 8, "seq_len": 512, "batch": 1,
                  "r2": True, "r3": False, "r4": True, "block": None, "kind": "hadamard",
                  "seed": 0}
"""Arguments of the ``spinquant`` step and their defaults: ``steps`` Cayley SGD steps,
``lr`` its step cap, ``samples`` rows of ``seq_len`` tokens taken from the calibration
loop, ``batch`` rows per step (None: all of them; k: k rows per step, cycling), and the
``rotate`` step's ``r2`` (learned per layer), ``r3``, ``r4``, ``block``, ``kind`` (the
initial matrices and R3/R4/block), ``seed``."""


# --- arguments and data ----------------------------------------------------------------------
def _check_args(args: dict) -> dict:
    """``args`` merged over :data:`SPINQUANT_ARGS`, checked (ConfigError naming the bad one)."""
    from lowbit.core.rotation import ROTATION_KINDS

    bad = sorted(set(args) - set(SPINQUANT_ARGS))
    if bad:
        raise ConfigError(f"algorithm spinquant: unknown argument {bad[0]!r}; expected one "
                          f"of: {', '.join(sorted(SPINQUANT_ARGS))}")
    a = {**SPINQUANT_ARGS, **args}
    for key, lo in (("steps", 0), ("samples", 1), ("seq_len", 2)):
        v = a[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"algorithm spinquant: {key} must be an integer >= {lo}, "
                              f"got {v!r}")
    lr = a["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 \
            or not math.isfinite(lr):
        raise ConfigError(f"algorithm spinquant: lr must be a positive number, got {lr!r}")
    for key in ("r2", "r3", "r4"):
        if not isinstance(a[key], bool):
            raise ConfigError(f"algorithm spinquant: {key} must be true or false, "
                              f"got {a[key]!r}")
    if a["kind"] not in ROTATION_KINDS:
        raise ConfigError(f"algorithm spinquant: kind must be one of "
                          f"{', '.join(ROTATION_KINDS)}; got {a['kind']!r}")
    b = a["block"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 2):
        raise ConfigError(f"algorithm spinquant: block must be null or an integer >= 2 "
                          f"(the quantization group size), got {b!r}")
    k = a["batch"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"algorithm spinquant: batch must be null or an integer >= 1, "
                          f"got {k!r}")
    if isinstance(a["seed"], bool) or not isinstance(a["seed"], int):
        raise ConfigError(f"algorithm spinquant: seed must be an integer, got {a['seed']!r}")
    return a


def capture_token_rows(model: nn.Module, forward_loop, samples: int, seq_len: int) \
        -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run ``forward_loop`` with the model's forward replaced by a recorder (nothing is
    computed) and return up to ``samples`` rows ``(input_ids [1, L], attention_mask [1, L]
    or None)``, ``L <= seq_len``, in the order the loop gave them. Raises
    :class:`CalibrationError` when the loop gives no token ids, :class:`ConfigError` for
    inputs other than token ids (``inputs_embeds``...)."""
    rows: list = []

    def forward(*a, **k):
        ids = a[0] if a else k.get("input_ids")
        if ids is None or not torch.is_tensor(ids) or ids.is_floating_point():
            raise ConfigError("spinquant trains on token ids: the forward loop called the "
                              f"model without input_ids (got {sorted(k)})")
        mask = k.get("attention_mask")
        ids = ids.detach().reshape(-1, ids.shape[-1])
        mask = None if mask is None else mask.detach().reshape(ids.shape)
        for i in range(ids.shape[0]):
            if len(rows) < samples:
                m = None if mask is None or bool(mask[i].all()) else mask[i:i + 1, :seq_len]
                rows.append((ids[i:i + 1, :seq_len].cpu(), None if m is None else m.cpu()))
        return None

    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    model.forward = forward
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        if had:
            model.forward = old
        else:
            del model.forward
    if not rows:
        raise CalibrationError("spinquant: the forward loop gave no token ids (did it call "
                               "the model?)")
    return rows


# --- what gets rotated -----------------------------------------------------------------------
@dataclass
class _Plan:
    """Module names of the rotated parts (from the rotation layout)."""

    embed: str
    head: str
    readers: list[str]  # linears reading the residual stream (input side R1)
    writers: list[str]  # linears writing it (output side R1), not behind a post-norm
    post_norms: list[str]  # sandwich post-norms: their output is rotated by R1 (online)
    extra: list[str]  # parameters [*, hidden] feeding the stream (P @ R1)
    values: list[tuple[str, slice | None, str]]  # (v_proj, its value rows, o_proj) per layer
    downs: list[str]  # down projections (R4)
    head_dim: int
    hidden: int
    inter: int
    head_hook: bool = False  # LM head not quantized: its input is rotated back instead


def _plan(layout, model: nn.Module | None = None) -> _Plan:
    """The names :func:`spinquant_step` rotates, read from ``layout`` (a
    :class:`lowbit.algorithms.rotate_layout.RotationLayout`)."""
    readers = [n for b in layout.blocks for _, names in b.readers for n in names]
    writers = [w for b in layout.blocks for w in b.writers if w not in b.post_norms]
    post = [n for b in layout.blocks for n in b.post_norms.values()]
    values = [(b.v_proj, b.v_rows, b.o_proj) for b in layout.blocks]
    downs = [b.down_proj for b in layout.blocks]
    head = None if model is None else model.get_submodule(layout.lm_head)
    hook = head is not None and not any(
        q.is_enabled for _, q in (head.quantizers() if hasattr(head, "quantizers") else []))
    return _Plan(layout.embed, layout.lm_head, readers, writers, post,
                 list(layout.extra_inputs), values, downs, layout.head_dim, layout.hidden,
                 layout.intermediate, hook)


# --- training state --------------------------------------------------------------------------
@contextmanager
def _training_state(model: nn.Module, plan: _Plan, hold: dict, r4: torch.Tensor | None):
    """Every parameter frozen, eval mode, static activation quantizers dynamic, hooks
    rotating the outputs of the embeddings and of the sandwich post-norms by ``hold["r1"]``
    and (``r4``) pre-hooks rotating down_proj inputs by R4; everything put back on exit."""
    from lowbit.core.rotation import rotate_last

    grads = {p: p.requires_grad for p in model.parameters()}
    # weights the functional forward substitutes are fake-quantized once per step by _pass
    # (straight-through), not once per micro-batch: their quantizers are off in the forward
    hold["wq"] = {}
    for key in _weight_keys(plan):
        m = model.get_submodule(key[:-len(".weight")])
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and wq.is_enabled:
            hold["wq"][key] = (m, wq.mode)
            wq.mode = "disabled"
    specs = []
    for _, q in quantizers(model):
        if q.is_enabled and q.needs_calibration:
            specs.append((q, q.spec))
            q.spec = q.spec.model_copy(update={"dynamic": True})
    was_training = model.training

    def rot_out(mod, a, out):
        return out @ hold["r1"].to(out.dtype)

    hooks = [model.get_submodule(n).register_forward_hook(rot_out)
             for n in [plan.embed, *plan.post_norms]]
    if plan.head_hook:  # (x R1) R1^T W^T = x W^T: no [vocab, hidden] product per step
        hooks.append(model.get_submodule(plan.head).register_forward_pre_hook(
            lambda mod, a: (a[0] @ hold["r1"].to(a[0].dtype).T, *a[1:])))
    if r4 is not None:
        r4f = r4.float()
        for n in plan.downs:
            hooks.append(model.get_submodule(n).register_forward_pre_hook(
                lambda mod, a: (rotate_last(a[0], r4f), *a[1:])))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for h in hooks:
            h.remove()
        for q, s in specs:
            q.spec = s
        for m, mode in hold.pop("wq").values():
            m.weight_quantizer.mode = mode
        for p, g in grads.items():
            p.requires_grad_(g)
        model.train(was_training)


def _weight_keys(plan: _Plan) -> list[str]:
    """The ``<linear>.weight`` keys :func:`_rotated` substitutes."""
    names = [*plan.readers, *plan.writers, *(v for v, _, _ in plan.values),
             *(o for _, _, o in plan.values)]
    if not plan.head_hook:
        names.append(plan.head)
    return sorted({n + ".weight" for n in names})


def _fake_weights(params: dict, wq: dict) -> dict:
    """``params`` with each weight of ``wq`` (``{key: (module, its quantizer's mode)}``)
    fake-quantized by its module's weight quantizer (differentiable: straight-through)."""
    out = dict(params)
    for key, (m, mode) in wq.items():
        q = m.weight_quantizer
        q.mode = mode
        try:
            out[key] = m.weight_from_2d(q(m.weight_2d(params[key])))
        finally:
            q.mode = "disabled"
    return out


def _base_weights(model: nn.Module, plan: _Plan, r4: torch.Tensor | None) -> dict:
    """Detached copies of the parameters the functional forward rotates (down_proj already
    ``@ R4``)."""
    base = {}
    names = {*plan.readers, *plan.writers, *plan.downs, plan.head,
             *(v for v, _, _ in plan.values), *(o for _, _, o in plan.values)}
    for n in names:
        m = model.get_submodule(n)
        base[n + ".weight"] = m.weight.detach()
        if getattr(m, "bias", None) is not None:
            base[n + ".bias"] = m.bias.detach()
    for p in plan.extra:
        base[p] = model.get_parameter(p).detach()
    if r4 is not None:
        for n in plan.downs:
            w = base[n + ".weight"]
            base[n + ".weight"] = (w.double() @ r4.to(w.device)).to(w.dtype)
    return base


def _rows_op(w: torch.Tensor, rows: slice | None, fn) -> torch.Tensor:
    """``w`` with ``fn`` applied to its rows ``rows`` (all when None), out of place."""
    if rows is None:
        return fn(w)
    start, stop, _ = rows.indices(w.shape[0])
    return torch.cat([w[:start], fn(w[start:stop]), w[stop:]])


def _rotated(plan: _Plan, base: dict, r1: torch.Tensor, r2s: list | None) -> dict:
    """The rotated parameters ``{name: tensor}`` for :func:`torch.func.functional_call`
    (differentiable in ``r1 [hidden, hidden]`` and ``r2s``: per layer ``[head_dim,
    head_dim]``, or None)."""
    out = {}
    for n in [*plan.readers] + ([] if plan.head_hook else [plan.head]):
        w = base[n + ".weight"]
        out[n + ".weight"] = w @ r1.to(w.dtype)
    for p in plan.extra:
        out[p] = base[p] @ r1.to(base[p].dtype)
    for n in plan.writers:
        w = base[n + ".weight"]
        out[n + ".weight"] = r1.to(w.dtype).T @ w
        if n + ".bias" in base:
            b = base[n + ".bias"]
            out[n + ".bias"] = b @ r1.to(b.dtype)
    if r2s is not None:
        d = plan.head_dim
        for (v, rows, o), r2 in zip(plan.values, r2s):
            wv = out.get(v + ".weight", base[v + ".weight"])
            r = r2.to(wv.dtype)
            out[v + ".weight"] = _rows_op(wv, rows, lambda x: torch.einsum(
                "de,kdh->keh", r, x.reshape(-1, d, x.shape[-1])).reshape(x.shape))
            if v + ".bias" in base:
                bv = out.get(v + ".bias", base[v + ".bias"])
                out[v + ".bias"] = _rows_op(bv, rows,
                                            lambda x: (x.reshape(-1, d) @ r).reshape(-1))
            wo = out.get(o + ".weight", base[o + ".weight"])
            out[o + ".weight"] = (wo.reshape(wo.shape[0], -1, d) @ r).reshape(wo.shape)
    return out


def _loss(model: nn.Module, params: dict, ids: torch.Tensor, mask) -> torch.Tensor:
    """Next-token cross-entropy (mean over predicted tokens) of the model with ``params``."""
    from torch.func import functional_call

    dev = next(iter(params.values())).device
    ids = ids.to(dev)
    mask = None if mask is None else mask.to(dev)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    kw = {"labels": labels, "use_cache": False}
    if mask is not None:
        kw["attention_mask"] = mask
    return functional_call(model, params, (ids,), kw).loss


def cayley_sgd_step(r: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group (SpinQuant's ``SGDG`` without momentum):
    ``r [n, n]`` orthogonal, ``g [n, n]`` the Euclidean gradient dL/dr; returns the next
    ``r`` (float64, orthogonal up to rounding): ``W = (r g^T - g r^T) / 2``, ``a = min(lr, 1
    / (|W|_1 + 1e-8))``, ``(I - a/2 W)^-1 (I + a/2 W) r``."""
    from lowbit.core.rotation import cayley

    r, g = r.double(), g.double()
    w = 0.5 * (r @ g.T - g @ r.T)
    a = min(float(lr), 1.0 / (float(w.abs().sum(0).max()) + 1e-8))
    return cayley(0.5 * a * w) @ r


def _micro_batches(rows, size: int = 2):
    """Rows of one length without a mask stacked into batches of up to ``size`` (fewer
    weight fake-quantizations per step); masked rows alone."""
    out, run = [], []
    for ids, mask in rows:
        if mask is None and (not run or run[0].shape == ids.shape) and len(run) < size:
            run.append(ids)
            continue
        if run:
            out.append((torch.cat(run), None))
            run = []
        if mask is None:
            run.append(ids)
        else:
            out.append((ids, mask))
    if run:
        out.append((torch.cat(run), None))
    return out


def _pass(model, plan, base, hold, r1, r2s, batches, backward: bool):
    """The quantized model's mean next-token loss on ``batches`` (token-weighted) with the
    matrices ``r1``/``r2s``; ``backward``: also the Euclidean gradients. Builds the rotated
    weights once, runs the micro-batches with those weights as leaves (their gradients
    accumulate) and then backpropagates into R in one pass. Returns ``(loss, g1, g2s)``."""
    x1 = r1.clone().requires_grad_(backward)
    x2 = None if r2s is None else [r.clone().requires_grad_(backward) for r in r2s]
    n_tok = sum(int(ids.numel()) for ids, _ in batches)
    total = 0.0
    with torch.enable_grad():  # on even without backward: no cached quantized weights
        r1f = x1.float()
        params = _rotated(plan, base, r1f, None if x2 is None else [r.float() for r in x2])
        params = _fake_weights(params, hold["wq"])
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        hold["r1"] = emb = r1f.detach().requires_grad_()
        for ids, mask in batches:
            loss = _loss(model, leaves, ids, mask)
            if not torch.isfinite(loss):
                raise CalibrationError(f"spinquant: the quantized model's loss is "
                                       f"{float(loss)}")
            w = ids.numel() / n_tok
            total += float(loss.detach()) * w
            if backward:
                (loss * w).backward()
            del loss
        if not backward:
            return total, None, None
        outs = [(params[k], v.grad) for k, v in leaves.items() if v.grad is not None] + \
            [(r1f, emb.grad)]
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
    return total, x1.grad, None if x2 is None else [x.grad for x in x2]


def _train(model, plan, rows, r1, r2s, steps, lr, r4, batch=None):
    """Cayley SGD on R1 (and R2s); returns ``(r1, r2s, info)``.

    ``batch`` None: every step uses all ``rows``; the matrices of the lowest loss (initial
    ones included) are returned. ``batch`` k: step ``t`` uses the rows ``t*k ... t*k+k-1``
    (cyclically); the loss on all rows is measured before and after, and the final matrices
    are returned only when they lower it. ``info``: ``loss_before``/``loss_after`` (all
    rows), ``loss_history`` (the loss of each step's rows before its update; all rows with
    ``batch`` None, plus the final one), ``best_step``."""
    hold = {"r1": r1}
    base = _base_weights(model, plan, r4)
    every = _micro_batches(rows)
    hist, best, init = [], (math.inf, 0, r1, r2s), (r1, r2s)
    with _training_state(model, plan, hold, r4):
        before = None
        if batch is not None and batch < len(rows):
            before, _, _ = _pass(model, plan, base, hold, r1, r2s, every, False)
        else:
            batch = None
        for t in range(steps + 1):
            train = t < steps
            if batch is None or not train:
                part = every
            else:
                n = len(rows)
                part = _micro_batches([rows[(t * batch + i) % n] for i in range(batch)])
            loss, g1, g2 = _pass(model, plan, base, hold, r1, r2s, part, train)
            hist.append(loss)
            if (batch is None or not train) and loss < best[0]:
                best = (loss, t, r1, r2s)
            if train:
                with torch.no_grad():
                    r1 = cayley_sgd_step(r1, g1, lr)
                    if r2s is not None:
                        r2s = [cayley_sgd_step(r, g, lr) for r, g in zip(r2s, g2)]
    if before is not None and before <= best[0]:
        return init[0], init[1], {"loss_before": before, "loss_after": before,
                                  "loss_history": hist, "best_step": 0}
    return best[2], best[3], {"loss_before": hist[0] if before is None else before,
                              "loss_after": best[0], "loss_history": hist,
                              "best_step": best[1]}


def apply_r2(model: nn.Module, plan: _Plan, r2s: list[torch.Tensor]) -> None:
    """Rotate in place, per layer, the value projection's output side per kv head
    (``W_h <- R2^T @ W_h``, bias ``b_h @ R2``; only its value rows when fused) and the output
    projection's input side per head (``W[:, h] <- W[:, h] @ R2``) (``r2s``: one float64
    ``[head_dim, head_dim]`` per layer): the model computes the same function."""
    from lowbit.algorithms.rotate_layout import rotate_input, rotate_output

    d = plan.head_dim
    for (v, rows, o), r2 in zip(plan.values, r2s):
        mv = model.get_submodule(v)
        n_rows = len(range(*rows.indices(mv.weight.shape[0]))) if rows is not None \
            else mv.weight.shape[0]
        rotate_output(mv, r2, v, heads=n_rows // d, rows=rows)
        mo = model.get_submodule(o)
        rotate_input(mo, r2, o, heads=mo.weight.shape[1] // d)


# --- the step --------------------------------------------------------------------------------
def spinquant_step(model: nn.Module, step, forward_loop, report) -> dict:
    """The ``spinquant`` model step (see the module doc). ``step.args``: see
    :data:`SPINQUANT_ARGS`; ``step.targets``: patterns of the linears that get the block
    rotation (default every quantized one). Returns the rotation record (as the ``rotate``
    step's, with a ``learned`` entry: loss before/after, steps, seconds), also set as
    ``report.rotations`` and ``model.lowbit_report.rotations``. Raises
    :class:`CalibrationError` without calibration data, :class:`ConfigError` for unknown or
    bad arguments, a model already calibrated, and families without a rotation layout."""
    from lowbit.algorithms.rotate import (apply_rotations, check_uncalibrated,
                                          default_block_linears)
    from lowbit.algorithms.rotate_layout import fold_norms, rotation_layout
    from lowbit.config.recipe import match
    from lowbit.core.rotation import is_orthogonal, rotation_matrix

    t0 = time.perf_counter()
    a = _check_args(dict(getattr(step, "args", None) or {}))
    if forward_loop is None:
        raise CalibrationError("algorithm spinquant trains the rotations on calibration data: "
                               "pass forward_loop= or calib_data= (or --calib TEXT), or use "
                               "the rotate step (data-free Hadamard rotations)")
    check_uncalibrated(model, "spinquant")
    done = [r for r in (report, getattr(model, "lowbit_report", None))
            if r is not None and getattr(r, "rotations", None)]
    if done:
        raise ConfigError("spinquant: the model was already rotated (a rotate or spinquant "
                          "step ran before); use one rotation step per recipe")
    layout = rotation_layout(model)
    plan = _plan(layout, model)
    rows = capture_token_rows(model, forward_loop, a["samples"], a["seq_len"])
    if any(ids.shape[-1] < 2 for ids, _ in rows):
        raise CalibrationError("spinquant: a calibration row has fewer than 2 tokens (no "
                               "next token to predict)")
    folded = fold_norms(model, layout)
    kind, seed = a["kind"], a["seed"]
    r1 = rotation_matrix(kind, plan.hidden, seed=seed)
    r2s = [rotation_matrix(kind, plan.head_dim, seed=seed + 1 + i)
           for i in range(len(plan.values))] if a["r2"] else None
    r4 = rotation_matrix(kind, plan.inter, seed=seed) if a["r4"] else None
    dev = model.get_submodule(plan.embed).weight.device  # train where the model is
    r1 = r1.to(dev)
    r2s = None if r2s is None else [r.to(dev) for r in r2s]
    r4 = None if r4 is None else r4.to(dev)
    t1 = time.perf_counter()
    r1, r2s, got = _train(model, plan, rows, r1, r2s, a["steps"], a["lr"], r4, a["batch"])
    t_train = time.perf_counter() - t1
    for r in [r1] + (r2s or []):
        if not is_orthogonal(r, tol=1e-6):
            raise CalibrationError("spinquant: a learned rotation drifted from orthogonal "
                                   "(more than 1e-6); use fewer steps")
    if r2s is not None:
        apply_r2(model, plan, r2s)
    r3 = rotation_matrix(kind, plan.head_dim, seed=seed) if a["r3"] else None
    blk = rotation_matrix(kind, a["block"], seed=seed) if a["block"] else None
    targets = getattr(step, "targets", None)
    block_linears = None
    if blk is not None:
        block_linears = [n for n in default_block_linears(model, layout)
                         if not targets or any(match(p, n) for p in targets)]
    fixed = {"kind": kind, "seed": seed}
    counts = apply_rotations(model, layout, r1=r1, r2=None, r4=r4, r3=r3, block=blk,
                             block_linears=block_linears,
                             specs={"r1": {"kind": "matrix", "seed": None}, "r3": fixed,
                                    "r4": fixed, "block": fixed})
    for m in model.modules():
        if hasattr(m, "invalidate_weight_cache"):
            m.invalidate_weight_cache()
    on = ["r1"] + [k for k in ("r2", "r3", "r4") if a[k]] + (["block"] if blk is not None
                                                            else [])
    sizes = {"r1": plan.hidden, "r2": plan.head_dim, "r3": plan.head_dim, "r4": plan.inter,
             "block": a["block"]}
    learned = {"matrices": ["r1"] + (["r2 (one per layer)"] if a["r2"] else []),
               "steps": a["steps"], "lr": a["lr"], "samples": len(rows),
               "tokens": sum(int(ids.numel()) for ids, _ in rows),
               "loss": "next-token cross-entropy of the quantized model (static activation "
                       "quantizers dynamic while training)",
               "batch": a["batch"], **got, "seconds_training": t_train,
               "seconds_per_step": t_train / max(1, a["steps"])}
    info = {"args": dict(a), "family": layout.family, "sizes": {k: sizes[k] for k in on},
            "kinds": {k: ("learned" if k in ("r1", "r2") else kind) for k in on},
            "seeds": {k: seed for k in on}, "folded_norms": folded["folded"],
            "untied_lm_head": folded["untied"],
            "online": {k: counts[k] for k in ("input", "qk", "norm_output")},
            "block_linears": counts["block_linears"], "learned": learned,
            "seconds": time.perf_counter() - t0}
    if folded["untied"]:
        warnings.warn(f"spinquant: the LM head {layout.lm_head} was tied to {layout.embed}; "
                      "it now has its own (rotated) weight (config.tie_word_embeddings = "
                      "False)", stacklevel=2)
    for rep in {id(r): r for r in (report, getattr(model, "lowbit_report", None))
                if r is not None}.values():
        rep.rotations = info
    return info


register_algorithm("spinquant", spinquant_step, scope="model", args=SPINQUANT_ARGS)
