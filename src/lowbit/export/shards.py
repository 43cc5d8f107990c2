"""Pieces every safetensors exporter shares: shards with an index, the model's plain
(non-quantized) tensors with tied weights written once, and the transformers side files
(config, generation config, tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path,
                 max_shard_size: int | None = None, metadata: dict | None = None) -> list[str]:
    """Write ``tensors`` into ``out_dir/model.safetensors`` or shards of at most
    ``max_shard_size`` bytes (a tensor larger than that gets a shard of its own) with
    ``model.safetensors.index.json``; returns the file names."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    items = list(tensors.items())
    if not max_shard_size:
        save_file(dict(items), str(out_dir / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in items:
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = []
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=meta)
        names.append(name)
        for k in shard:
            weight_map[k] = name
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}, indent=1))
    return names


def plain_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict of ``model`` without the keys in ``skip`` and without quantizer
    buffers, tied tensors once (the first name in state-dict order keeps the data, as
    transformers' ``save_pretrained`` does: ``embed_tokens`` before ``lm_head``).

    Returns ``(tensors, tied)`` with ``tied`` mapping each dropped duplicate to the kept
    name. ``dtype`` casts floating tensors. A skipped (quantized) weight shared with a plain
    tensor does not hide it: the plain one is written in full.
    """
    sd = model.state_dict(keep_vars=False)
    seen: dict[tuple[int, tuple, torch.dtype], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for k, v in sd.items():
        if k in skip or "_quantizer." in k:
            continue
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if v.numel() > 0 and key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    return tensors, tied


def shares_storage(model: nn.Module, keys: set[str]) -> bool:
    """Whether a tensor named in ``keys`` shares storage with a state-dict entry not in it
    (e.g. a quantized ``lm_head`` tied to ``embed_tokens``)."""
    sd = model.state_dict(keep_vars=False)
    ptrs = {sd[k].data_ptr() for k in keys if k in sd and sd[k].numel()}
    return any(v.data_ptr() in ptrs for k, v in sd.items() if k not in keys and v.numel())


def write_hf_files(model: nn.Module, out_dir: Path, tokenizer=None,
                   config_updates: dict | None = None) -> None:
    """``config.json`` (with ``config_updates`` merged in), ``generation_config.json`` and
    the tokenizer files, for models that have a transformers config."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "save_pretrained"):
        cfg.save_pretrained(out_dir)
        if config_updates:
            f = out_dir / "config.json"
            data = json.loads(f.read_text())
            for k, v in config_updates.items():
                if v is None:
                    data.pop(k, None)
                else:
                    data[k] = v
            f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(out_dir)
            except Exception:  # an invalid generation config is not worth failing the export
                pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
