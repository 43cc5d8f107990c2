"""Streaming quantization of a checkpoint larger than memory, one decoder block at a time.

:func:`quantize_checkpoint` reads a transformers model folder (``config.json`` and
safetensors shards) and writes a native lowbit checkpoint without ever holding the model:

1. the model is built from ``config.json`` with its parameters on the meta device;
   the recipe's quantizers are inserted (no weights needed);
2. the parameters outside the decoder blocks (embeddings, final norm, head) and block 0 are
   read from the shards, and the calibration batches run until block 0, whose inputs are
   captured (as in :mod:`lowbit.pipeline.blocks`; the first batch records every block's
   arguments without running the blocks); then everything but the captured inputs goes
   back to the meta device;
3. for each block: its weights are read, the recipe's algorithm steps and calibration run
   on it (:func:`lowbit.pipeline.blocks.process_block`, the very code of the in-memory
   runner), its outputs become the next block's inputs, its quantized tensors are written
   to the work folder, and its weights go back to the meta device;
4. the tensors outside the blocks are read again and written with the config, and the
   output folder is assembled from the parts (one safetensors shard per block).

Peak memory: one block's weights (in the compute ``dtype``), what its algorithm needs
(GPTQ: the Hessians of the block, then per linear one float32 ``[in, in]`` matrix, e.g.
485 MB for an 11008-wide down_proj, factorized and inverted in place, plus three
weight-sized float32 matrices), the calibration activations of one block (``samples x seq
x hidden`` in the compute dtype, twice while they are replaced) and the interpreter with
torch. glibc is told to give every freed buffer of 1 MiB or more back to the system at
once (:func:`lowbit.pipeline.blocks.return_large_frees`), so this bound holds from the
first block to the last. The embeddings and head are loaded only during capture and
the final export. Every finished block is saved, so an interrupted run resumes
(:mod:`lowbit.pipeline.resume`); under ``torchrun`` the calibration is data-parallel
(:mod:`lowbit.pipeline.distributed`).

MoE models: the experts are split per expert on the meta device (as
:func:`lowbit.quantize` does), so a block holds its own experts only, and each expert's
weights are read from the checkpoint's layout (per-expert names, Mixtral's ``w1/w2/w3``, or
stacked ``[E, ...]`` tensors read one expert slab at a time: :mod:`lowbit.pipeline.source`).

The result equals ``lowbit.save(lowbit.quantize(model, recipe, calib_data=...))`` of the
same model loaded in the same dtype (tensor for tensor); recipes without algorithm steps
calibrate block by block, as ``lowbit.quantize(..., blockwise=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit import recipes as _recipes
from lowbit.adapters import get_adapter
from lowbit.adapters.experts import unfuse_experts
from lowbit.errors import CalibrationError, CheckpointError, ConfigError
from lowbit.nn.swap import apply_recipe
from lowbit.nn.utils import quantizers
from lowbit.pipeline.algorithms import recipe_steps
from lowbit.pipeline.blocks import (BlockContext, chunk_layout, process_block,
                                   return_large_frees, trim_heap)
from lowbit.pipeline.capture import capture_block_inputs
from lowbit.pipeline.distributed import Collective, current, shard_batches
from lowbit.pipeline.resume import WorkDir, digest, kill_hook
from lowbit.pipeline.source import SafetensorsSource, build_skeleton, materialize, release

__all__ = ["StreamResult", "quantize_checkpoint"]


@dataclass
class StreamResult:
    """What :func:`quantize_checkpoint` did: the output folder, one report row per block
    (``block``; ``seconds`` in all = ``load_seconds`` reading its weights +
    ``compute_seconds`` for the steps, calibration and next inputs + ``write_seconds``; what
    the steps reported), the first block this call ran (> 0 when it resumed), the total
    seconds of this call, and the source's bytes."""

    out_dir: Path
    blocks: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    source_bytes: int = 0

    @property
    def experts(self) -> list[dict]:
        """MoE: the routed calibration tokens of every expert, as ``lowbit.quantize``'s
        ``report.experts`` (``{block, expert, name, routed_tokens, min_tokens,
        fallback}``), gathered from the block rows."""
        return [r for b in self.blocks for r in b.get("experts", [])]

    def lines(self) -> list[str]:
        """Report lines: routed tokens per expert and the under-calibrated experts with
        their fallback (MoE; empty for a dense model)."""
        from lowbit.pipeline.moe import expert_lines

        return expert_lines(self.experts)


def _calls(batches: Any) -> list:
    """Calibration batches as model calls: ``[1, seq]`` tensors or dicts of inputs."""
    if isinstance(batches, torch.Tensor):
        b = batches.unsqueeze(0) if batches.dim() == 1 else batches
        return [row.unsqueeze(0) for row in b]
    out = []
    for i, b in enumerate(batches):
        if isinstance(b, torch.Tensor):
            out.append(b.unsqueeze(0) if b.dim() == 1 else b)
        elif isinstance(b, dict):
            out.append(b)
        else:
            raise ConfigError(f"calibration batch {i} is a {type(b).__name__}, expected a "
                              "tensor of token ids or a dict of model inputs")
    return out


def _loop(calls: list, device) -> Callable[[nn.Module], None]:
    def forward_loop(model):
        with torch.no_grad():
            for b in calls:
                if isinstance(b, dict):
                    model(**{k: v.to(device) if torch.is_tensor(v) else v
                             for k, v in b.items()})
                else:
                    model(b.to(device))
    return forward_loop


def _view(path: str, module: nn.Module) -> nn.Module:
    """An empty module holding ``module`` at ``path`` (so its names are the model's)."""
    root = cur = nn.Module()
    parts = path.split(".")
    for p in parts[:-1]:
        nxt = nn.Module()
        cur.add_module(p, nxt)
        cur = nxt
    cur.add_module(parts[-1], module)
    return root


def _check_outside(model: nn.Module, prefix: str) -> None:
    """Static activation quantizers outside the blocks would need a whole-model pass."""
    for name, q in quantizers(model):
        if not name.startswith(prefix + ".") and q.needs_calibration and q.is_enabled:
            raise ConfigError(f"quantizer {name} is outside the decoder blocks and needs "
                              "calibration, which streaming cannot do; exclude that module "
                              "or make its activations dynamic")


def _export_rest(model: nn.Module, prefix: str, work: WorkDir, tokenizer) -> None:
    from lowbit.export.base import atomic_dir
    from lowbit.export.native import export

    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = parent._modules[attr]
    parent._modules[attr] = nn.ModuleList()  # the blocks are written already
    try:
        with atomic_dir(work.rest_dir(), overwrite=True) as tmp:
            export(model, tmp, tokenizer=tokenizer)
    finally:
        parent._modules[attr] = blocks


def quantize_checkpoint(src_dir: "str | os.PathLike", recipe: Any, calib_data: Any,
                        out_dir: "str | os.PathLike", *, chunk_size: int = 8,
                        feed: str | None = None, dtype: "torch.dtype | str | None" = None,
                        device: "str | torch.device" = "cpu", resume: bool = True,
                        work_dir: "str | os.PathLike | None" = None, overwrite: bool = False,
                        tokenizer=None, progress: Callable[[int, int, str], None] | None = None,
                        comm: Collective | None = None, **overrides: Any) -> StreamResult:
    """Quantize the transformers checkpoint in ``src_dir`` block by block into the native
    lowbit checkpoint ``out_dir`` (loadable with ``lowbit.load``), holding one block at a
    time (see the module doc for the memory bound).

    Args:
        src_dir: folder with ``config.json`` and safetensors weights (one file, shards with
            ``model.safetensors.index.json``, or ``*.safetensors``).
        recipe: preset name, YAML path, dict or Recipe (``**overrides`` as in
            :func:`lowbit.quantize`). Model-wide algorithm steps and static activation
            quantizers outside the decoder blocks are not possible here (ConfigError).
        calib_data: token ids ``LongTensor [n, seq]`` (or a list of ``[seq]`` tensors /
            dicts of model inputs), the **whole** set on every rank; None for recipes that
            need no data (weight-only RTN).
        chunk_size: samples per block call; ``feed``: ``"quantized"`` or ``"fp"`` inputs
            for the next block (as :func:`lowbit.pipeline.blocks.run_blocks`; None: the
            recipe's ``feed``, else ``"quantized"``).
        dtype: compute and storage dtype of the unquantized tensors (default: the config's
            ``dtype``, else float32). ``device``: where blocks run (``"cuda"``...).
        resume: continue an interrupted run found in ``work_dir`` (default
            ``.<out name>.partial`` beside ``out_dir``); False starts over.
        overwrite: replace an existing ``out_dir`` (else CheckpointError).
        tokenizer: saved alongside (``save_pretrained``).
        progress: ``callable(done, total, block_name)`` after each block.
        comm: data-parallel calibration (default: the initialized process group, e.g.
            under torchrun after :func:`lowbit.pipeline.distributed.init_from_env`); each
            rank takes its share of ``calib_data``; rank 0 writes.

    Returns a :class:`StreamResult`. The output is written atomically (the folder appears
    complete or not at all).
    """
    t0 = time.perf_counter()
    return_large_frees()  # a long run must not creep up through heap fragmentation
    comm = comm if comm is not None else current()
    from lowbit.config import Recipe
    from lowbit.pipeline.moe import expert_rows, split_overrides

    overrides, moe_options = split_overrides(overrides)
    recipe = _recipes.load(recipe, **overrides)
    if moe_options:  # moe_calibrate_all_experts / moe_min_tokens, as lowbit.quantize takes
        recipe = Recipe.parse({**recipe.to_dict(), **moe_options}, f"recipe {recipe.name}")
    feed = feed if feed is not None else (recipe.feed or "quantized")
    if feed not in ("quantized", "fp"):
        raise ConfigError(f"feed must be 'quantized' or 'fp', got {feed!r}")
    if getattr(recipe, "gguf_mix", None) is not None:
        raise ConfigError(f"recipe {recipe.name}: a GGUF mix (gguf_mix) is planned on the whole "
                          "model, which streaming never holds; use lowbit.quantize")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; choose a new folder or overwrite it")
    source = SafetensorsSource(src_dir)
    model = build_skeleton(src_dir, dtype)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = torch.device(device)
    unfuse_experts(model)  # MoE: per-expert linears on meta, read per expert (see source)
    apply_recipe(model, recipe)
    model.lowbit_recipe = recipe
    model_steps, steps = recipe_steps(recipe)
    if model_steps:
        raise ConfigError(f"recipe {recipe.name}: model-wide algorithm steps need the whole "
                          "model in memory; streaming runs block steps only")
    adapter = get_adapter(model)
    found = adapter.find_blocks(model) if adapter is not None else None
    if found is None:
        raise ConfigError(f"{src_dir}: no decoder blocks found; streaming needs a model made "
                          "of blocks (use lowbit.quantize)")
    prefix, blocks = found
    _check_outside(model, prefix)
    needs_data = bool(steps) or any(q.needs_calibration and q.is_enabled
                                    for _, q in quantizers(model))
    if needs_data and calib_data is None:
        raise CalibrationError(f"recipe {recipe.name} needs calibration data: pass calib_data")
    calls = _calls(shard_batches(calib_data, chunk_size, comm)) if needs_data else None
    fingerprint = {"source": source.fingerprint(), "recipe": recipe.to_dict(),
                   "calib": digest(calib_data) if needs_data else None,
                   "chunk_size": chunk_size, "feed": feed, "dtype": str(dtype),
                   "device": device.type, "world_size": comm.world_size,
                   "blocks": len(blocks)}
    comm.check_same(json.dumps(fingerprint, sort_keys=True, default=str), "the job")
    work = WorkDir(work_dir or out_dir.with_name(f".{out_dir.name}.partial"), fingerprint,
                   resume, comm)
    start = work.start()
    result = StreamResult(out_dir, resumed_from=start, source_bytes=source.nbytes)
    n = len(blocks)
    chunks, overrides_, layout, offset = None, [{} for _ in blocks], None, 0
    loaded = set()
    load0 = 0.0
    if needs_data and start < n:
        materialize(model, "", source, dtype, device, skip=prefix)
        t1 = time.perf_counter()
        materialize(model, f"{prefix}.0", source, dtype, device)
        load0 = time.perf_counter() - t1
        loaded.add(0)
        captured = capture_block_inputs(model, blocks, _loop(calls, device), chunk_size,
                                        run_later_blocks=False)
        chunks, overrides_ = captured.chunks, captured.overrides
        release(model, "", skip=prefix)  # embeddings and head: back to meta until the end
        if start > 0:
            work.load_inputs(start, chunks)
            release(model, f"{prefix}.0")
            loaded.discard(0)
        trim_heap()
        layout, offset = chunk_layout(chunks, comm)
    for i in range(start, n):
        name = f"{prefix}.{i}"
        t1 = time.perf_counter()
        if i not in loaded:
            materialize(model, name, source, dtype, device)
        load_s = time.perf_counter() - t1 + (load0 if i == 0 else 0.0)
        if chunks is not None:
            ctx = BlockContext(model, blocks[i], name, i, adapter, chunks, overrides_[i],
                               comm=comm, layout=layout, offset=offset, low_memory=True,
                               moe_all=recipe.calibrate_all_experts,
                               moe_min_tokens=recipe.moe_min_tokens)
            row = dict(process_block(ctx, steps, feed, last=i == n - 1))
            row["compute_seconds"] = row.pop("seconds")
            experts = expert_rows(blocks[i], recipe.calibrate_all_experts,
                                  recipe.moe_min_tokens)
            if experts:  # names relative to the block -> full names
                row["experts"] = [{**r, "block": f"{name}.{r['block']}".rstrip("."),
                                   "name": f"{name}.{r['name']}"} for r in experts]
            del ctx
        else:
            row = {"block": name, "calibrated": 0, "compute_seconds": 0.0}
        t2 = time.perf_counter()
        if comm.is_main:
            from lowbit.export.base import atomic_dir
            from lowbit.export.native import export

            view = _view(name, blocks[i])
            view.lowbit_recipe = recipe
            with atomic_dir(work.block_dir(i), overwrite=True) as tmp:
                export(view, tmp)
        if chunks is not None and i < n - 1:
            work.save_inputs(i + 1, chunks)
        kill_hook("exported", i)
        row.update(load_seconds=round(load_s, 3),
                   write_seconds=round(time.perf_counter() - t2, 3),
                   seconds=round(time.perf_counter() - t1 + (load0 if i == 0 else 0.0), 3))
        comm.barrier()
        work.mark_done(i, row)
        comm.barrier()
        work.drop_inputs(i)
        release(model, name)
        loaded.discard(i)
        trim_heap()
        result.blocks.append(row)
        kill_hook("done", i)
        if progress is not None:
            progress(i + 1, n, name)
    if chunks is not None:
        chunks.clear()
    if comm.is_main:
        materialize(model, "", source, dtype, device, skip=prefix)
        _export_rest(model, prefix, work, tokenizer)
        release(model, "", skip=prefix)
        assemble(work, n, out_dir, model, overwrite)
    comm.barrier()
    work.remove()
    result.blocks = work.rows
    result.seconds = time.perf_counter() - t0
    return result


# --- the output folder --------------------------------------------------------------------------
def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge_metas(rest: dict, parts: list[dict], order: dict[str, int]) -> dict:
    """The ``lowbit_checkpoint.json`` of the whole model from the rest's and the blocks'
    (``order``: module name -> position in ``named_modules``)."""
    def pos(name: str) -> tuple[int, str]:
        mod = name
        while mod and mod not in order:
            mod = mod.rpartition(".")[0]
        return order.get(mod, len(order)), name

    out = dict(rest)
    for key in ("modules", "quantized", "tied"):
        d: dict = {}
        for m in (*parts, rest):
            d.update(m.get(key) or {})
        out[key] = dict(sorted(d.items(), key=lambda kv: pos(kv[0])))
    kv_names = sorted({n for m in (*parts, rest) for n in m["kv_cache"]["quantizers"]}, key=pos)
    # the recipe's KV-cache spec (the rest's), else the first quantizer's, as one export does
    spec = rest["kv_cache"]["spec"] or next((m["kv_cache"]["spec"] for m in parts
                                             if m["kv_cache"]["spec"]), None)
    out["kv_cache"] = {"spec": spec, "quantizers": kv_names}
    out["disabled"] = sorted({n for m in (*parts, rest) for n in m.get("disabled", [])}, key=pos)
    experts: dict = {}
    for m in (*parts, rest):
        experts.update(m.get("moe_experts") or {})
    out["moe_experts"] = dict(sorted(experts.items(), key=lambda kv: pos(kv[0])))
    return out


def assemble(work: WorkDir, n_blocks: int, out_dir: Path, model: nn.Module,
             overwrite: bool = False) -> Path:
    """Build ``out_dir`` (atomically) from the finished parts in ``work``: one shard per
    block and one for the rest, their index, the merged metadata and the config files."""
    from lowbit.export.base import atomic_dir
    from lowbit.export.native import META

    parts = [work.block_dir(i) for i in range(n_blocks)] + [work.rest_dir()]
    for d in parts:
        if not (d / META).is_file():
            raise CheckpointError(f"{d} is incomplete: the run cannot be assembled")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    total, weight_map, metas = 0, {}, []
    with atomic_dir(out_dir, overwrite) as tmp:
        for i, d in enumerate(parts):
            fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            _link(d / "model.safetensors", tmp / fname)
            src = SafetensorsSource(d, files=[d / "model.safetensors"])
            for k, e in src.entries.items():
                weight_map[k] = fname
                total += e[2]
            metas.append(json.loads((d / META).read_text()))
        meta = merge_metas(metas[-1], metas[:-1], order)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total, "format": "lowbit"}, "weight_map": weight_map},
            indent=1))
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for f in work.rest_dir().iterdir():  # config, generation config, tokenizer
            if f.name not in ("model.safetensors", META) and f.is_file():
                _link(f, tmp / f.name)
    return out_dir
