"""Writing safetensors shards (with an index when there is more than one)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


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
