"""The registry of algorithm steps a recipe can name, and their dispatch.

A step is registered with :func:`register_algorithm`. Block steps (the default scope) are
``fn(ctx, args)`` with ``ctx`` a :class:`lowbit.pipeline.blocks.BlockContext`: the block
runner calls them for each decoder block in turn, in the order of the recipe, then
calibrates the block. Model steps (``scope="model"``) are ``fn(model, step, forward_loop,
report)`` and run once, before the block steps. The built-in steps (``smoothquant``,
``awq``, ``gptq``) are registered by :mod:`lowbit.algorithms.steps`.
"""

from __future__ import annotations

from typing import Callable

from lowbit.errors import CalibrationError, ConfigError

_ALGORITHMS: dict[str, tuple[Callable, str, dict | None]] = {}


def register_algorithm(name: str, fn: Callable, scope: str = "block",
                       args: dict | None = None) -> Callable:
    """Register ``fn`` as the algorithm step ``name`` (``scope``: ``"block"`` or
    ``"model"``, see the module doc); ``args``: the arguments it accepts with their defaults
    (checked before anything runs; None: not checked). Returns ``fn``."""
    if scope not in ("block", "model"):
        raise ConfigError(f"algorithm {name}: scope must be 'block' or 'model', got {scope!r}")
    _ALGORITHMS[name] = (fn, scope, args)
    return fn


def algorithm_args(name: str) -> dict | None:
    """The arguments (with defaults) that step ``name`` accepts."""
    _load_builtins()
    return _ALGORITHMS[name][2] if name in _ALGORITHMS else None


def _load_builtins() -> None:
    import lowbit.algorithms.steps  # noqa: F401  (registers smoothquant, awq, gptq, imatrix)
    import lowbit.algorithms.rotate  # noqa: F401  (registers rotate)
    import lowbit.algorithms.spinquant  # noqa: F401  (registers spinquant)


def algorithm_names() -> list[str]:
    """Names of the algorithm steps a recipe can use."""
    _load_builtins()
    return list(_ALGORITHMS)


step_names = algorithm_names


def _arg_type_error(default, value) -> str | None:
    """What an argument should be, judged by its default's type (None: anything goes, as
    for defaults of None), or None when ``value`` fits: a string "false" is not a bool."""
    if default is None or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "a list"
    return None


def recipe_steps(recipe) -> tuple[list[tuple], list[tuple]]:
    """``(model_steps, block_steps)`` of ``recipe``, checked: ``model_steps`` as ``[(fn,
    step)]``, ``block_steps`` as ``[(fn, args with defaults, targets)]`` for the block
    runner. Unknown steps or arguments: :class:`ConfigError`."""
    _load_builtins()
    for step in recipe.algorithms:
        if step.name not in _ALGORITHMS:
            raise ConfigError(f"recipe {recipe.name}: unknown algorithm {step.name!r}; "
                              f"expected one of: {', '.join(_ALGORITHMS)}")
        allowed = _ALGORITHMS[step.name][2]
        bad = sorted(set(step.args) - set(allowed)) if allowed is not None else []
        if bad:
            raise ConfigError(f"recipe {recipe.name}: algorithm {step.name}: unknown argument "
                              f"{bad[0]!r}; expected one of: {', '.join(sorted(allowed))}")
        for k, v in step.args.items():
            want = _arg_type_error(allowed.get(k) if allowed else None, v)
            if want:
                raise ConfigError(f"recipe {recipe.name}: algorithm {step.name}: argument "
                                  f"{k}={v!r}; expected {want}")
    model_steps, block_steps = [], []
    for step in recipe.algorithms:
        fn, scope, allowed = _ALGORITHMS[step.name]
        if scope == "model":
            model_steps.append((fn, step))
        else:
            block_steps.append((fn, {**(allowed or {}), **step.args}, step.targets))
    return model_steps, block_steps


def run_algorithms(model, recipe, forward_loop, report, feed: str = "quantized",
                   chunk_size: int = 8, progress=None, comm=None, moe_all: bool = False,
                   moe_min_tokens: int | None = None) -> list[dict]:
    """Run the recipe's algorithm steps: model steps first, then the block steps with the
    block-by-block runner (which also calibrates each block). Returns the runner's rows.
    ``comm``: data-parallel calibration; ``moe_all``/``moe_min_tokens``: MoE calibration
    (see :func:`lowbit.pipeline.blocks.run_blocks`)."""
    from lowbit.pipeline.blocks import run_blocks

    model_steps, block_steps = recipe_steps(recipe)
    block_steps, rows = _imatrix_files(model, recipe, model_steps, block_steps, forward_loop)
    for fn, step in model_steps:
        fn(model, step, forward_loop, report)
    if block_steps:
        rows += run_blocks(model, block_steps, forward_loop, None, feed=feed,
                           chunk_size=chunk_size, progress=progress, comm=comm,
                           moe_all=moe_all, moe_min_tokens=moe_min_tokens)
        row = _imatrix_outside_blocks(model, block_steps, forward_loop, comm)
        if row is not None:
            rows.append(row)
    if report is not None and (rows or block_steps):
        report.blocks = rows
    return rows


def imatrix_importance(model, path) -> dict:
    """``{module name: mean x^2 [in] (float32)}`` from the llama.cpp imatrix file ``path``
    (:func:`lowbit.calib.imatrix_file.read_imatrix`), its tensor names mapped to ``model``'s
    modules by :func:`lowbit.adapters.gguf_names.gguf_tensor_names`; a split expert gets
    its own row of the stacked ``*_exps`` entry. Modules the file does not name are left
    out; an entry whose width does not match its module is a :class:`CalibrationError`."""
    import torch

    from lowbit.adapters.gguf_names import gguf_tensor_names
    from lowbit.calib.imatrix_file import imatrix_means, read_imatrix
    from lowbit.errors import CalibrationError
    from lowbit.pipeline.moe import expert_of

    entries = read_imatrix(path)
    out = {}
    for mod, t in gguf_tensor_names(model).items():
        if t.name not in entries:
            continue
        means = imatrix_means(*entries[t.name])  # [n_mat, I]
        row = 0
        if t.expert:
            found = expert_of(model, mod)
            row = found[2] if found is not None else 0
        if means.shape[-1] != t.n_cols or row >= means.shape[0]:
            raise CalibrationError(f"imatrix file {str(path)!r}: {t.name} has "
                                   f"{means.shape[0]}x{means.shape[-1]} values; module {mod} "
                                   f"needs {'expert ' + str(row) + ' of ' if t.expert else ''}"
                                   f"{t.n_cols} (in_features): a file of another model?")
        out[mod] = torch.from_numpy(means[row].copy())
    return out


def _imatrix_files(model, recipe, model_steps, block_steps, forward_loop):
    """Apply the ``imatrix`` steps that name a ``file`` (model-wide, before the block steps:
    the file's statistics describe the model's unchanged weights, so such a step must come
    first) and check that a step without one has data. Returns the remaining block steps and
    the report rows of the applied files."""
    from lowbit.algorithms.imatrix import apply_importance, imatrix_step, is_ggml

    rest, rows = [], []
    if any(fn is imatrix_step for fn, _, _ in block_steps) and \
            not any(is_ggml(m) for m in model.modules()):
        raise ConfigError(f"recipe {recipe.name}: the imatrix step sets the scales of GGUF "
                          "block types (gguf_* weight formats, e.g. the gguf-* mix presets) "
                          "and the recipe quantizes no weight with one; for other formats "
                          "use gptq or awq")
    for i, (fn, args, targets) in enumerate(block_steps):
        if fn is not imatrix_step:
            rest.append((fn, args, targets))
            continue
        if args.get("file") is None:
            if forward_loop is None:
                raise CalibrationError(
                    f"recipe {recipe.name}: the imatrix step needs calibration data (pass "
                    "forward_loop= or calib_data=, or --calib TEXT) or an imatrix file "
                    "(args: {file: imatrix.gguf}); without data use the preset without "
                    "-imatrix (data-free weighting)")
            rest.append((fn, args, targets))
            continue
        if rest or model_steps:
            raise ConfigError(f"recipe {recipe.name}: an imatrix step with a file must come "
                              "before the other algorithm steps (the file's statistics are of "
                              "the model's original weights)")
        if targets:
            raise ConfigError(f"recipe {recipe.name}: an imatrix step with a file takes no "
                              "targets (every gguf_* weight the file names is set)")
        info = apply_importance(model, imatrix_importance(model, args["file"]))
        rows.append({"block": "(imatrix file)", "file": str(args["file"]), **info})
    return rest, rows


def _imatrix_outside_blocks(model, block_steps, forward_loop, comm) -> dict | None:
    """The ``gguf_*`` linears outside the decoder blocks (the output layer) that an
    ``imatrix`` step with data selects get their importance from one more pass of
    ``forward_loop`` over the (quantized) model, as llama-imatrix sees ``output.weight``.
    Returns the report row (None when there is nothing to do)."""
    from lowbit.adapters import get_adapter
    from lowbit.algorithms.imatrix import (collect_model_importance, imatrix_step, is_ggml,
                                           set_importance_scales)
    from lowbit.config.recipe import match
    from lowbit.pipeline.distributed import current

    steps = [(args, targets) for fn, args, targets in block_steps if fn is imatrix_step]
    adapter = get_adapter(model)
    found = adapter.find_blocks(model) if adapter is not None else None
    if not steps or found is None:  # no decoder blocks: the whole model was the block
        return None
    prefix = found[0] + "."
    targets = steps[-1][1]
    names = [n for n, m in model.named_modules() if is_ggml(m) and not n.startswith(prefix)
             and (not targets or any(match(p, n) for p in targets))]
    if not names:
        return None
    got = collect_model_importance(model, names, forward_loop,
                                   comm if comm is not None else current())
    counts, none = {}, []
    for n in names:
        sq, tokens = got[n]
        if tokens == 0:
            none.append(n)
            set_importance_scales(model.get_submodule(n), None, n)
            continue
        set_importance_scales(model.get_submodule(n), (sq / tokens).float(), n)
        counts[n] = tokens
    row = {"block": "(outside the blocks)", "imatrix_tokens": counts}
    if none:
        row["imatrix_no_tokens"] = none
    return row
