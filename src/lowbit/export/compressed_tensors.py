"""compressed-tensors checkpoints, the format vLLM and transformers load.

The tensors follow compressed-tensors 0.20 (``compressors/`` of that package). The config
comes from the library itself when it is installed (:mod:`lowbit.export.ct_schema`: its
pydantic models validate and dump every scheme, its format inference picks each layer's
format), else from lowbit's copy of its rules, tested equal to the library's. Per quantized
``Linear`` ``m`` and the compression format of its scheme:

================================ ==========================================================
format                           tensors of ``m``
================================ ==========================================================
``pack-quantized`` (INT weights, ``weight_packed`` int32 (32 codes in ``bits`` words, little
weight-only)                     end first, offset ``2^(bits-1)``), ``weight_scale``,
                                 ``weight_shape`` int64 [2], ``weight_zero_point`` (asym:
                                 int32, packed along the output dimension)
``int-quantized`` (INT weights + ``weight`` int8, ``weight_scale`` (+ ``weight_zero_point``
activations), ``naive-quantized``int8), ``input_scale`` [1] for static activations
``float-quantized`` (FP8 weights  ``weight`` float8_e4m3fn, ``weight_scale``, ``input_scale``
+ activations), ``naive-quantized``
``nvfp4-pack-quantized``         ``weight_packed`` uint8 (two e2m1 per byte, low nibble
                                 first), ``weight_scale`` float8_e4m3fn [O, I/16],
                                 ``weight_global_scale`` float32 [1], ``input_global_scale``
``mxfp4-pack-quantized``         ``weight_packed`` uint8, ``weight_scale`` uint8 (E8M0 codes)
``mxfp8-quantized``              ``weight`` float8_e4m3fn, ``weight_scale`` uint8 (E8M0)
================================ ==========================================================

Mixture-of-experts models: each expert's tensors are named as the family's original
checkpoints name them (Mixtral: ``block_sparse_moe.experts.E.w1``), read from transformers'
own conversion mapping (:mod:`lowbit.export.moe_names`); routers and shared-expert gates are
listed in ``ignore``; with several config groups, a group's experts are one ``re:`` target.

KV-cache scales are ``k_scale``/``v_scale`` [1] (``KVCacheScaleType``) on the attention
module (``model.layers.N.self_attn.k_scale``; vLLM remaps them to ``self_attn.attn.k_scale``)
with ``kv_cache_scheme`` in the config: static per-tensor scales of the keys after RoPE and
of the values. transformers >= 5.24 with compressed-tensors <= 0.20.1 does not apply them
(the attention's ``past_key_values`` parameter became ``cache``, which compressed-tensors
does not recognise): the load reports them as unexpected keys and runs the cache in float.
``config.json`` gets ``quantization_config`` as compressed-tensors writes it
(``config_groups`` with ``targets``, ``ignore``, ``format``, ``quant_method:
compressed-tensors``, ``quantization_status: compressed``, ``version``).

Online rotations (:mod:`lowbit.nn.rotation`) go to ``transform_config`` (see
:func:`_transforms`): a linear's ``input_rotation`` at location ``input`` (``head_dim`` = the
block of a block-diagonal one), an attention's ``qk_rotation`` at ``q_attn`` + ``k_cache``
(``head_dim`` = the head width), the matrix stored as ``<module>.<scheme>_<location>.weight``
= ``sqrt(b) * R``; a norm's ``output_rotation`` is a ConfigError. Offline rotations are in
the weights.

Numerics: compressed-tensors dequantizes ``(q - zero_point) * scale`` in the dtype of the
scale, and divides by its NVFP4 global scale (``448 * 6 / amax``) where lowbit multiplies by
``amax / (448 * 6)``. So:

* float scales are stored in the export dtype (the model's, or ``dtype=``), which is the
  dtype transformers gives the scale parameters on load; a scale that dtype cannot hold
  exactly is reported with a warning (quantize with ``scale_format: bf16``/``fp16`` for a
  16-bit export and the checkpoint is exact);
* the NVFP4 global scale is written as the float32 ``g`` next to ``1 / global`` for which
  ``s / g == s * global`` holds for every e4m3 block scale ``s``, so decompressed weights
  equal lowbit's bit for bit;
* NVFP4, MXFP4 and MXFP8 weights decompress to bfloat16 in compressed-tensors (transformers
  needs ``dtype=torch.bfloat16`` for them), so those exports default to ``dtype=bfloat16``.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from lowbit import formats
from lowbit.core import QTensor, QuantSpec, compute_scales
from lowbit.errors import ConfigError
from lowbit.export import ct_schema, moe_names
from lowbit.export.base import quantized_modules, weight_qtensor
from lowbit.export.shards import plain_tensors, shares_storage, write_hf_files, write_shards
from lowbit.nn.routers import find_routers
from lowbit.nn.utils import quantizers

_E4M3 = formats.get("e4m3")
# compressed-tensors decompresses these to bfloat16 weights whatever the model's dtype
BF16_FORMATS = {"nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized"}


# --- QuantSpec -> QuantizationArgs ---------------------------------------------------------
def _args(spec: QuantSpec, role: str, where: str) -> dict:
    """The ``QuantizationArgs`` dict of ``spec`` as compressed-tensors dumps it (validated
    by the installed library, see :func:`lowbit.export.ct_schema.quantization_args`)."""
    return ct_schema.quantization_args(_arg_fields(spec, role, where), where)


def _arg_fields(spec: QuantSpec, role: str, where: str) -> dict:
    """The ``QuantizationArgs`` fields that express ``spec`` (None: not set)."""
    bf = spec.block_format
    a = {"num_bits": None, "type": None, "symmetric": spec.symmetric, "group_size": None,
         "strategy": None, "block_structure": None, "dynamic": spec.dynamic,
         "scale_dtype": None, "zp_dtype": None}
    if bf is not None:
        if bf.name == "nvfp4":
            a.update(num_bits=4, type="float", group_size=16, strategy="tensor_group",
                     scale_dtype="torch.float8_e4m3fn")
            if role != "weight":
                if spec.dynamic:
                    raise ConfigError(f"{where}: compressed-tensors needs a calibrated global "
                                      "scale for NVFP4 activations; use dynamic: false")
                a["dynamic"] = "local"  # static global scale, block scales per input
            return a
        if bf.name in ("mxfp4", "mxfp8_e4m3"):
            a.update(num_bits=4 if bf.name == "mxfp4" else 8, type="float", group_size=32,
                     strategy="group", scale_dtype="torch.uint8")
            if role != "weight" and not spec.dynamic:
                raise ConfigError(f"{where}: compressed-tensors computes {bf.name} activation "
                                  "scales at run time; use dynamic: true")
            return a
        raise ConfigError(f"{where}: compressed-tensors has no format for {bf.name}")
    fmt = spec.element_format
    if fmt.kind == "int":
        if not fmt.signed:
            raise ConfigError(f"{where}: compressed-tensors stores signed integers; "
                              f"{spec.format} is unsigned (use int{fmt.bits}, symmetric: false)")
        a.update(num_bits=fmt.bits, type="int")
        if not spec.symmetric:
            a["zp_dtype"] = "torch.int8"
        if role != "weight" and (spec.narrow_range or (
                spec.symmetric and spec.dynamic and spec.sym_scale != "half_range")):
            raise ConfigError(f"{where}: compressed-tensors quantizes integer activations "
                              "over the full range with scale amax / ((qmax - qmin) / 2); "
                              "narrow_range / sym_scale: qmax cannot be exported exactly")
    elif spec.format == "fp8_e4m3":
        a.update(num_bits=8, type="float")
    else:
        raise ConfigError(f"{where}: compressed-tensors has no element format {spec.format} "
                          "(int2..int8, fp8_e4m3, nvfp4, mxfp4, mxfp8_e4m3)")
    g = spec.granularity
    if g == "tensor":
        a["strategy"] = "tensor"
    elif g == "channel":
        if role != "weight":
            raise ConfigError(f"{where}: compressed-tensors has no per-channel activation "
                              "scales (tensor, token or group)")
        if spec.axis not in (0, -2):
            raise ConfigError(f"{where}: per-channel weight scales must be per output channel "
                              f"(axis 0), not axis {spec.axis}")
        a["strategy"] = "channel"
    elif g == "group":
        if spec.axis not in (-1, 1):
            raise ConfigError(f"{where}: groups must run along the input dimension (axis -1)")
        a.update(strategy="group", group_size=spec.group_size)
    elif g == "block":
        a.update(strategy="block", block_structure=list(spec.block))
    else:  # token
        a["strategy"] = "token"
    if role != "weight" and not spec.dynamic and g != "tensor":
        raise ConfigError(f"{where}: static activation scales must be per tensor for "
                          f"compressed-tensors, not {g}")
    return a


# --- tensors ---------------------------------------------------------------------------------
def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` along the last dim: signed ``values`` (any int
    dtype) offset by ``2^(bits-1)``, element ``i`` at bit ``i * bits`` of the row, 32-bit
    little-endian words, ``ceil(n * bits / 32)`` words per row."""
    fmt = formats.get(f"int{bits}")
    return packed_to_int32(formats.pack(fmt.encode(values.float()), bits), bits,
                           values.shape[-1])


def packed_to_int32(stream: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """lowbit's packed two's-complement codes (:func:`lowbit.formats.pack` of ``n`` signed
    ``bits``-bit codes per row) as compressed-tensors' int32 words: the same little-endian
    bit stream with each code offset by ``2^(bits-1)`` (its top bit flipped), zero-padded
    to ``ceil(n * bits / 32)`` words."""
    mask = formats.pack(torch.full((n,), 1 << (bits - 1), dtype=torch.uint8,
                                   device=stream.device), bits)
    words = math.ceil(n * bits / 32)
    nbytes = words * 4
    k = min(nbytes, stream.shape[-1])
    buf = torch.zeros(*stream.shape[:-1], nbytes, dtype=torch.uint8,
                      device=stream.device)  # fresh, contiguous
    buf[..., :k] = stream[..., :k] ^ mask[:k]  # bytes past the codes stay zero padding
    out = buf.view(torch.int32)
    if not _little_endian():
        out = buf.reshape(*buf.shape[:-1], words, 4).flip(-1).contiguous().view(
            torch.int32).reshape(*buf.shape[:-1], words)
    return out


def _little_endian() -> bool:
    import sys

    return sys.byteorder == "little"


def _int_values(qt: QTensor) -> torch.Tensor:
    return qt.element_format.code_to_int(qt.codes)


def ct_global_scale(gs: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors' NVFP4 global scale for lowbit's ``gs``, as float32 [1].

    compressed-tensors divides each e4m3 block scale ``s`` by its global scale ``g``;
    lowbit multiplies by ``gs``. ``g = 1 / gs`` rounded is usually 1 ulp off for some ``s``,
    so the float32 ``g`` within 64 ulps of ``1 / gs`` is chosen for which ``s / g == s * gs``
    holds for the most block scales (``used``: the ones a tensor has; default every e4m3
    value), ties to the nearest. Often it holds for all; otherwise the remaining scales
    differ by 1 float32 ulp, below the bfloat16 rounding of the decompressed weights.
    """
    gs = gs.detach().float().cpu().reshape(())
    vals = _E4M3.values() if used is None else used.detach().float().cpu().reshape(-1).unique()
    vals = vals[vals > 0]
    want = vals * gs
    base = (1.0 / gs).reshape(1)
    bits = base.view(torch.int32)
    best, best_score = base, -1
    for k in range(65):
        for d in ((0,) if k == 0 else (k, -k)):
            c = (bits + d).view(torch.float32)
            score = int((vals / c == want).sum())
            if score > best_score:
                best, best_score = c.clone(), score
            if score == vals.numel():
                return best
    return best


def _exact_cast(t: torch.Tensor, dtype: torch.dtype, inexact: list[str], name: str):
    out = t.to(dtype)
    if not torch.equal(out.float(), t.float()):
        inexact.append(name)
    return out.contiguous()


def _weight_tensors(prefix: str, qt: QTensor, fmt: str, dtype: torch.dtype,
                    inexact: list[str]) -> dict[str, torch.Tensor]:
    spec = qt.spec
    out: dict[str, torch.Tensor] = {}
    nat = qt.scale
    if spec.granularity == "tensor":
        nat = nat.reshape(1)
    if fmt == "pack-quantized":
        bits = spec.element_format.bits
        ct_schema.check_int32_packing(bits, pack_int32, prefix)
        out["weight_packed"] = packed_to_int32(qt.packed_codes(), bits, qt.shape[-1])
        out["weight_shape"] = torch.tensor(list(qt.shape), dtype=torch.int64)
        out["weight_scale"] = _exact_cast(nat, dtype, inexact, f"{prefix}.weight_scale")
        if qt.zero_point is not None:
            zp = qt.zero_point
            if spec.granularity in ("group", "channel"):
                out["weight_zero_point"] = pack_int32(zp.t(), bits).t().contiguous()
            else:
                out["weight_zero_point"] = zp.reshape(1).to(torch.int8)
    elif fmt in ("int-quantized", "naive-quantized", "float-quantized", "mxfp8-quantized"):
        if spec.element_format.kind == "int":
            out["weight"] = _int_values(qt).to(torch.int8)
        else:
            out["weight"] = qt.codes.contiguous().view(torch.float8_e4m3fn)
        if fmt == "mxfp8-quantized":
            out["weight_scale"] = qt.scale_codes().contiguous()
        else:
            out["weight_scale"] = _exact_cast(nat, dtype, inexact, f"{prefix}.weight_scale")
        if qt.zero_point is not None:
            out["weight_zero_point"] = qt.zero_point.reshape(nat.shape).to(torch.int8)
    elif fmt == "nvfp4-pack-quantized":
        out["weight_packed"] = qt.packed_codes().contiguous()
        out["weight_scale"] = qt.scale.to(torch.float8_e4m3fn).contiguous()
        out["weight_global_scale"] = ct_global_scale(qt.global_scale, qt.scale)
    elif fmt == "mxfp4-pack-quantized":
        out["weight_packed"] = qt.packed_codes().contiguous()
        out["weight_scale"] = qt.scale_codes().contiguous()
    else:  # a format a newer compressed-tensors infers that lowbit does not write yet
        raise ConfigError(f"{prefix}: compressed-tensors {ct_schema.version()} stores this "
                          f"scheme as {fmt}, which lowbit cannot write")
    return {f"{prefix}.{k}": v for k, v in out.items()}


def _static_scale(q, spec: QuantSpec, n: int = 1):
    """``(scale [1], zero_point [1] | None, global | None)`` of a static quantizer, computed
    by lowbit's own rule from its calibrated amax (the values fake quantization uses)."""
    block = spec.group_size if spec.block_format is not None else 1
    dummy = torch.zeros(n, block, device=q.amax.device)
    _, _, s, zp, extra = compute_scales(dummy, spec, amax=q.amax, amin=q.amin)
    if extra is not None:
        return None, None, extra[1].reshape(1)
    return s.reshape(1), None if zp is None else zp.reshape(1), None


def _activation_tensors(prefix: str, base: str, q, dtype, inexact) -> dict[str, torch.Tensor]:
    spec = q.spec
    if spec.dynamic or not q.is_enabled:
        return {}
    if q.amax is None:
        raise ConfigError(f"{q.qname or prefix}: static quantizer was never calibrated; "
                          "calibrate before exporting")
    s, zp, g = _static_scale(q, spec)
    out = {}
    if g is not None:
        out[f"{prefix}.{base}_global_scale"] = ct_global_scale(g)
        return out
    out[f"{prefix}.{base}_scale"] = _exact_cast(s, dtype, inexact, f"{prefix}.{base}_scale")
    if zp is not None:
        out[f"{prefix}.{base}_zero_point"] = zp.to(torch.int8)
    return out


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# --- the exporter ----------------------------------------------------------------------------
def export(model: nn.Module, out_dir: Path, tokenizer=None, max_shard_size: int | None = None,
           dtype: "torch.dtype | str | None" = None, **unknown) -> None:
    """Write ``model`` (quantized by lowbit) as a compressed-tensors checkpoint.

    Options: ``tokenizer`` (saved alongside), ``max_shard_size`` (bytes per shard),
    ``dtype``: the dtype of the checkpoint's float tensors and of ``config.json`` (default:
    the model's; bfloat16 when NVFP4/MXFP4 weights are present, as compressed-tensors
    decompresses those to bfloat16). Raises ConfigError for a spec compressed-tensors
    cannot express exactly (e.g. uint codes, per-channel activation scales).
    """
    from lowbit.options import accepted_options, reject_unknown

    reject_unknown(unknown, "export format 'compressed-tensors'",
                   accepted_options(export, ("model", "out_dir")))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    tensors: dict[str, torch.Tensor] = {}
    groups: "OrderedDict[str, dict]" = OrderedDict()
    skip: set[str] = set()
    inexact: list[str] = []
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized: list[tuple[str, nn.Module, dict]] = []
    for name, m in quantized_modules(model):
        if not isinstance(m, nn.Linear):
            raise ConfigError(f"{name}: compressed-tensors quantizes Linear layers only, not "
                              f"{type(m).__name__}; leave it out of the recipe (an exclude "
                              "pattern naming it) to export the rest")
        roles = {}
        for role, key in (("weight", "weights"), ("input", "input_activations"),
                          ("output", "output_activations")):
            q = getattr(m, f"{role}_quantizer")
            roles[key] = _args(q.spec, role, f"{name}.{role}_quantizer") \
                if q.is_enabled else None
        if all(v is None for v in roles.values()):
            continue
        roles["format"] = ct_schema.scheme_format(
            roles["weights"], roles["input_activations"], roles["output_activations"], name)
        quantized.append((name, m, roles))
    formats_used = {r["format"] for _, _, r in quantized}
    if dtype is None:
        dtype = _model_dtype(model)
        if formats_used & BF16_FORMATS:
            dtype = torch.bfloat16
    for name, m, roles in quantized:
        if roles["weights"] is not None:
            qt = weight_qtensor(m).to("cpu")  # packed and written on the CPU
            skip.add(f"{name}.weight")
            tensors.update(_weight_tensors(name, qt, roles["format"], dtype, inexact))
        if roles["input_activations"] is not None:
            tensors.update(_activation_tensors(name, "input", m.input_quantizer, dtype, inexact))
        if roles["output_activations"] is not None:
            tensors.update(_activation_tensors(name, "output", m.output_quantizer, dtype,
                                               inexact))
        key = repr(sorted((k, repr(v)) for k, v in roles.items()))
        groups.setdefault(key, {"roles": roles, "names": []})["names"].append(name)
    kv_args, kv_tensors = _kv_cache(model, dtype, inexact)
    tensors.update(kv_tensors)
    t_groups, t_tensors = _transforms(model)
    skip |= _rotation_buffers(model)  # written as transform weights, under their names
    if not quantized and kv_args is None:
        raise ConfigError("the model has no quantized layer to export; quantize it first")
    untie = shares_storage(model, skip)
    plain, _tied = plain_tensors(model, skip, dtype)
    tensors.update(plain)
    qnames = {n for n, _, _ in quantized}
    config_groups = []
    for g in groups.values():
        r = g["roles"]
        # one scheme for the whole model targets the layer type, as llm-compressor writes it
        targets = ["Linear"] if len(groups) == 1 else list(g["names"])
        config_groups.append({"targets": targets, "weights": r["weights"],
                              "input_activations": r["input_activations"],
                              "output_activations": r["output_activations"],
                              "format": r["format"]})
    ignore = [n for n in linear_names if n not in qnames] if len(groups) <= 1 else []
    # routers and shared-expert gates stay float: listed whatever their module type, so that
    # engines that hold them as linears (vLLM's ReplicatedLinear gate) leave them alone
    floats = set(ignore) | {n for n in find_routers(model) if n not in qnames}
    ignore = [n for n, _ in model.named_modules() if n in floats]
    tensors, config_groups, ignore = _checkpoint_names(model, tensors, config_groups, ignore)
    tensors.update(t_tensors)  # after the renaming: rotations of experts are refused
    qconfig = ct_schema.build_config(config_groups, ignore, kv_args,
                                     ct_schema.transform_config(t_groups))
    if inexact:
        warnings.warn(f"{len(inexact)} scale tensor(s) (first: {inexact[0]}) are not exactly "
                      f"representable in {dtype}: the loaded model will differ from the "
                      f"fake-quantized one at {dtype} rounding level; quantize with a "
                      f"matching scale_format for an exact checkpoint", stacklevel=3)
    write_shards(tensors, out_dir, max_shard_size, {"format": "pt"})
    updates = {"quantization_config": qconfig, "dtype": str(dtype).split(".")[-1],
               "torch_dtype": None}
    if untie:
        updates["tie_word_embeddings"] = False
    write_hf_files(model, out_dir, tokenizer, updates)


def _checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor],
                      config_groups: list[dict], ignore: list[str]):
    """Tensors, config groups and ignore list under the names of the family's original
    checkpoints (:mod:`lowbit.export.moe_names`: per-expert names of MoE models, e.g.
    Mixtral's ``block_sparse_moe.experts.E.w1``); unchanged for a model without experts."""
    modules = [t for g in config_groups for t in g["targets"] if t != "Linear"] + ignore
    keys, mods = moe_names.checkpoint_names(model, tensors, modules)
    if not moe_names.moe_experts(model):
        return tensors, config_groups, ignore
    tensors = {keys[k]: v for k, v in tensors.items()}
    groups = [dict(g, targets=moe_names.expert_targets(model, g["targets"], mods))
              for g in config_groups]
    return tensors, groups, [mods[n] for n in ignore]


def _kv_cache(model: nn.Module, dtype, inexact) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """``(kv_cache_scheme args | None, {attention.k_scale / v_scale [1]: scale})`` of the
    model's KV-cache quantizers (static per-tensor; see the module doc)."""
    args = None
    out: dict[str, torch.Tensor] = {}
    names = ct_schema.kv_scale_names()
    for name, q in quantizers(model):
        if q.role != "kv_cache" or not q.is_enabled:
            continue
        mod, _, qname = name.rpartition(".")
        if qname.endswith("_fallback"):
            raise ConfigError(f"{name}: this attention module quantizes its K/V projection "
                              "outputs (before RoPE); compressed-tensors quantizes the cache "
                              "after RoPE, so it cannot be exported exactly")
        spec = q.spec
        if spec.granularity != "tensor" or spec.dynamic or spec.block_format is not None:
            raise ConfigError(f"{name}: compressed-tensors KV-cache scales are static per "
                              f"tensor; got {spec.short()}")
        a = _args(spec, "kv_cache", name)
        if args is not None and a != args:
            raise ConfigError(f"{name}: every attention layer needs the same KV-cache spec")
        args = a
        if q.amax is None:
            raise ConfigError(f"{name}: KV-cache quantizer was never calibrated")
        s, zp, _ = _static_scale(q, spec)
        scale_name = names[0] if qname.startswith("k_") else names[1]  # k_scale / v_scale
        out[f"{mod}.{scale_name}"] = _exact_cast(s, dtype, inexact, f"{mod}.{scale_name}")
        if zp is not None:  # compressed-tensors' qparam naming: k_zero_point / v_zero_point
            zp_name = scale_name.removesuffix("_scale") + "_zero_point"
            out[f"{mod}.{zp_name}"] = zp.to(torch.int8)
    return args, out


# --- online rotations -> transform_config --------------------------------------------------
_CT_LOCATIONS = {"input": ("input",), "qk": ("q_attn", "k_cache")}


def _sylvester(n: int) -> torch.Tensor | None:
    """compressed-tensors' unnormalised ``deterministic_hadamard_matrix(n)`` (float64), or
    None when ``n`` is not a power of two (it has none then)."""
    if n < 1 or n & (n - 1):
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _rotation_buffers(model: nn.Module) -> set[str]:
    """State-dict names of the online rotations' matrices (``<owner>.<attr>.matrix``)."""
    from lowbit.nn.rotation import ATTRS

    return {f"{n}.{attr}.matrix" if n else f"{attr}.matrix"
            for n, m in model.named_modules() for attr in ATTRS.values()
            if attr in m._modules}


def _transforms(model: nn.Module) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """The online rotations of ``model`` as compressed-tensors transform schemes:
    ``({scheme name: {type, head_dim, apply}}, {"<module>.<scheme>_<location>.weight":
    [b, b] float32})``.

    One scheme per distinct matrix and place (the readers share one weight per scheme and
    size). The stored weight is ``sqrt(b) * R`` (``R`` lowbit's exact ``[b, b]`` matrix), the
    unnormalised form both compressed-tensors' ``HadamardTransform`` and vLLM divide by
    ``sqrt(b)``: type ``hadamard`` when ``R`` is Sylvester's matrix (the one the readers
    build themselves), else ``random-hadamard``, whose weights come from the checkpoint
    (compressed-tensors' ``random-matrix`` is applied unnormalised by compressed-tensors and
    normalised by vLLM, so no reader agrees on it). ``head_dim`` is the block of a
    block-diagonal rotation and the head width of a q/k rotation. A rotation the format
    cannot express (a norm's output rotation) is a ConfigError naming the module."""
    from lowbit.nn.rotation import ATTRS, online_rotations

    rots = online_rotations(model)
    if rots and moe_names.moe_experts(model):
        raise ConfigError(f"{next(iter(rots))}: online rotations in a mixture-of-experts "
                          "model are not exported to compressed-tensors; rotate with r4: "
                          "false, r3: false, block: null (offline rotations only)")
    groups: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    by_key: dict[tuple, str] = {}
    for key, spec in rots.items():
        name, where = key.split("#")[0], spec["where"]
        if where == "norm_output":
            raise ConfigError(
                f"{name}: online rotation of a norm's output (a sandwich post-norm, e.g. "
                "Gemma-2/3) has no compressed-tensors transform location (transforms attach "
                "to Linear inputs/outputs, queries and keys); export with format=native, or "
                "rotate without r1 for this family")
        rot = model.get_submodule(name)._modules[ATTRS[where]]
        mat = rot.matrix.detach().to(torch.float64).cpu()
        b = mat.shape[0]
        syl = _sylvester(b)
        stored = (mat * math.sqrt(b)).to(torch.float32)
        is_syl = syl is not None and torch.allclose(mat * math.sqrt(b), syl, atol=1e-5)
        head_dim = b if (where == "qk" or b != spec["size"]) else None
        if where == "input" and not isinstance(model.get_submodule(name), nn.Linear):
            raise ConfigError(f"{name}: compressed-tensors applies input transforms to "
                              "Linear layers only; this module holds an input rotation")
        gkey = (where, head_dim, stored.numpy().tobytes())
        scheme = by_key.get(gkey)
        if scheme is None:
            scheme = f"R3_{len(by_key)}" if where == "qk" else f"online_{len(by_key)}"
            by_key[gkey] = scheme
            groups[scheme] = {
                "type": "hadamard" if is_syl else "random-hadamard", "head_dim": head_dim,
                "apply": [{"targets": [], "location": loc} for loc in _CT_LOCATIONS[where]]}
        for a in groups[scheme]["apply"]:
            a["targets"].append(name)
            tensors[f"{name}.{scheme}_{a['location']}.weight"] = stored.clone()
    for g in groups.values():
        b = g["head_dim"] or model.get_submodule(g["apply"][0]["targets"][0]).in_features
        if g["type"] == "random-hadamard" and not ct_schema.builds_random_hadamard(b):
            warnings.warn(f"{g['apply'][0]['targets'][0]}: compressed-tensors "
                          f"{ct_schema.version()} cannot build a random Hadamard matrix of "
                          f"size {b}, which its apply_transform_config does before loading the "
                          "stored one: that reader will fail on this checkpoint (vLLM loads "
                          "the stored matrix)", stacklevel=3)
        if g["type"] not in ct_schema.transform_types():
            raise ConfigError(f"compressed-tensors {ct_schema.version()} has no transform "
                              f"type {g['type']!r} for {g['apply'][0]['targets'][0]}")
    return groups, tensors
