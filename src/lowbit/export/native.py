"""lowbit's own checkpoint: packed codes + scales + recipe, reloadable without the FP model.

Layout of the folder:

* ``lowbit_checkpoint.json``: format version, the recipe (as YAML-ready dict), and for every
  quantized module its spec, 2-D weight shape and tensor names; tied parameters;
* ``model.safetensors`` (or shards ``model-00001-of-0000N.safetensors`` with
  ``model.safetensors.index.json``): for a quantized weight ``W`` of module ``m``:
  ``m.weight.codes`` (uint8, codes packed along the input dimension, see
  :mod:`lowbit.formats.packing`), ``m.weight.scale`` (float32, stored layout; e4m3/e8m0 scales
  as their uint8 codes), ``m.weight.zero_point`` (int32, affine only), ``m.weight.global_scale``
  (NVFP4); calibrated statistics of activation and KV-cache quantizers under their module
  names (``...input_quantizer.amax``); every other parameter and buffer as it is;
* ``config.json`` (+ tokenizer files) for transformers models.

:func:`load` rebuilds the model from ``config.json``, applies the recipe, and installs the
dequantized weights with their fixed scales: its outputs equal the exported model's bit for
bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit import formats
from lowbit.core import QTensor, QuantSpec, dequantize
from lowbit.errors import CheckpointError
from lowbit.export.base import quantized_modules, weight_qtensor
from lowbit.export.shards import write_shards
from lowbit.nn.utils import quantizers

VERSION = 1
META = "lowbit_checkpoint.json"


def _scale_tensor(qt: QTensor) -> torch.Tensor:
    codes = qt.scale_codes()
    return codes if codes is not None else qt.scale.float().contiguous()


def export(model: nn.Module, out_dir: Path, tokenizer=None, max_shard_size: int | None = None,
           **_ignored) -> None:
    """Write ``model`` (quantized by lowbit) as a native lowbit checkpoint into ``out_dir``."""
    recipe = getattr(model, "lowbit_recipe", None)
    tensors: dict[str, torch.Tensor] = {}
    qmeta: dict[str, dict] = {}
    skip: set[str] = set()
    for name, m in quantized_modules(model):
        qt = weight_qtensor(m)
        if qt is None:
            continue
        key = f"{name}.weight"
        skip.add(key)
        tensors[f"{key}.codes"] = qt.packed_codes().contiguous()
        tensors[f"{key}.scale"] = _scale_tensor(qt)
        if qt.zero_point is not None:
            tensors[f"{key}.zero_point"] = qt.zero_point.contiguous()
        if qt.global_scale is not None:
            tensors[f"{key}.global_scale"] = qt.global_scale.reshape(1).float()
        qmeta[name] = {"shape": list(qt.shape), "dtype": str(m.weight.dtype).split(".")[-1],
                       "spec": qt.spec.model_dump(exclude_defaults=True),
                       "fixed": m.weight_quantizer.scale is not None}
    for name, q in quantizers(model):
        if q.role != "weight" and q.amax is not None:
            tensors[f"{name}.amax"] = q.amax.float().contiguous()
            if q.amin is not None:
                tensors[f"{name}.amin"] = q.amin.float().contiguous()
    # everything else, tied tensors once
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=False).items():
        if k in skip or ".weight_quantizer." in k or "_quantizer." in k:
            continue
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            tied[k] = seen[ptr]
            continue
        seen[ptr] = k
        tensors[k] = v.detach().contiguous()
    # a tied weight whose target is a quantized weight keeps its own float copy
    meta = {"format": "lowbit", "version": VERSION,
            "model_class": type(model).__name__,
            "recipe": recipe.to_dict() if recipe is not None else None,
            "quantized": qmeta, "tied": tied,
            "kv_cache": [n for n, q in quantizers(model) if q.role == "kv_cache"]}
    write_shards(tensors, out_dir, max_shard_size, {"format": "lowbit"})
    (out_dir / META).write_text(json.dumps(meta, indent=1))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "save_pretrained"):
        cfg.save_pretrained(out_dir)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(out_dir)
            except Exception:  # generation config is optional
                pass
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def qtensor_from(meta: dict, tensors: dict[str, torch.Tensor], key: str) -> QTensor:
    """Rebuild the QTensor of quantized weight ``key`` (``module.weight``) from a checkpoint."""
    spec = QuantSpec.parse(meta["spec"], key)
    shape = tuple(meta["shape"])
    fmt = spec.element_format
    codes = formats.unpack(tensors[f"{key}.codes"], fmt.bits, shape[-1])
    scale = tensors[f"{key}.scale"]
    if spec.scale_format in ("e4m3", "e8m0"):
        scale = formats.get(spec.scale_format).decode(scale)
    zp = tensors.get(f"{key}.zero_point")
    gs = tensors.get(f"{key}.global_scale")
    return QTensor(codes, scale.float(), zp, spec, shape,
                   getattr(torch, meta.get("dtype", "float32")),
                   None if gs is None else gs.reshape(()))


def load(path: "str | Path", device: str = "cpu") -> nn.Module:
    """Rebuild a quantized transformers model from a native lowbit checkpoint folder."""
    from lowbit.export.safe_read import read_checkpoint

    path = Path(path)
    meta, tensors = read_checkpoint(path)
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.config import Recipe
    from lowbit.nn import apply_recipe

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    recipe = Recipe.parse(meta["recipe"], f"{path / META}: recipe") if meta["recipe"] else None
    if recipe is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_recipe(model, recipe)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, qm in meta["quantized"].items():
            key = f"{name}.weight"
            qt = qtensor_from(qm, tensors, key)
            m = mods[name]
            m.weight.copy_(m.weight_from_2d(dequantize(qt, torch.float32)).to(m.weight.dtype))
            m.weight_quantizer.set_fixed_scale(qt.scale, qt.zero_point, qt.global_scale)
            m.invalidate_weight_cache()
        rest = {k: v for k, v in tensors.items()
                if not any(k.endswith(s) for s in (".codes", ".scale", ".zero_point",
                                                   ".global_scale", ".amax", ".amin"))}
        missing, _ = model.load_state_dict(rest, strict=False)
        allowed = set(meta["tied"]) | {f"{n}.weight" for n in meta["quantized"]}
        bad = [k for k in missing if k not in allowed and "_quantizer." not in k
               and not k.endswith("rotary_emb.inv_freq")]
        if bad:
            raise CheckpointError(f"{path}: tensor {bad[0]!r} is missing from the checkpoint "
                                  f"({len(bad)} missing in all)")
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        for name, q in quantizers(model):
            a = tensors.get(f"{name}.amax")
            if a is not None:
                q.set_amax(a, tensors.get(f"{name}.amin"))
    model.lowbit_recipe = recipe
    return model.to(device)
