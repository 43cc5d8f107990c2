"""GGUF export for llama.cpp: lowbit's quantized weights as ggml block types, bit for bit.

>>> lowbit.save(model, "out/", format="gguf", tokenizer=tok)   # writes out/model.gguf  # doctest: +SKIP

What is written (llama.cpp's conventions, as its ``convert_hf_to_gguf.py`` writes them):

* dense families Llama, Mistral (``llama``), Qwen2, Qwen3, Gemma-2, Gemma-3 (the text class
  and the text tower of the multimodal class; llama.cpp reads the vision tower from a
  separate mmproj file, which is not written: a warning says so), Phi-3/Phi-4, OLMo-2,
  Granite, GPT-2; each
  family's facts (rotary row order, ``1 + w`` norms written as ``w + 1``, soft-capping,
  sliding window, fused ``attn_qkv``/``ffn_up``, what llama.cpp hard-codes and a config must
  agree with) are declared in :mod:`lowbit.adapters.gguf_archs`;
* mixture-of-experts models (Mixtral as ``llama`` with experts, Qwen2-MoE, Qwen3-MoE,
  OLMoE; other MoE families are refused by name): experts stacked into
  ``blk.N.ffn_{gate,up,down}_exps``, routers F32, expert metadata (see
  :mod:`lowbit.export.gguf_moe`);
* tensors named by ``gguf.TensorNameMap`` (``blk.N.attn_q.weight`` ...); the rows of
  ``q_proj``/``k_proj`` (weights and biases) permuted for llama.cpp's rotary layout on the
  ``llama`` architecture (Llama, Mistral; not Qwen2/Qwen3), codes and scales together;
* quantized weights in the ggml type that holds lowbit's codes and scales exactly (see
  :mod:`lowbit.export.gguf_types`: Q8_0, Q4_0, Q5_0, Q4_1, Q5_1, MXFP4; and every weight
  quantized with a ``gguf_*`` spec, K-quants, IQ4_NL/IQ4_XS and NVFP4 included, whose
  ggml fields are packed as they are), so that ``gguf.quants.dequantize`` of the file gives
  the fake-quantized weights bit for bit (fused projections too);
  a weight with no exact type is a ConfigError naming it, unless ``allow_requantize=True``:
  then ``requantize_type="nearest"`` (default) writes it in the smallest ggml type that
  keeps its codes (its own scales rounded to float16, or a type searched by lowbit.core; see
  :mod:`lowbit.export.gguf_requant`), or ``requantize_type`` names one type (``"q8_0"``,
  ``"q4_k"``...); a warning lists each such layer with its type and max/RMS change;
* norms and biases in F32, other unquantized matrices in ``float_type`` (``"f32"``, exact;
  ``"f16"`` or ``"bf16"``); the token embedding in ``embedding_type`` and an unquantized
  output head in ``output_type`` (llama-quantize's ``--token-embedding-type`` /
  ``--output-tensor-type``): ``f32``/``f16``/``bf16`` or a ggml type (``q8_0`` ...
  ``q6_k``, ``iq4_xs``...), quantized at export by lowbit.core's quantizer with data-free
  weighting (as llama-quantize does for token_embd, which it never weights by an imatrix);
  lowbit's own model keeps these in float, so a warning says so. Defaults: the types of
  the GGUF mix the model was quantized with (``model.lowbit_recipe.gguf_mix``, see
  :mod:`lowbit.adapters.gguf_mix`), else ``float_type``. A tied embedding takes
  ``output_type`` when no ``embedding_type`` is given (llama.cpp's rule). Tied embeddings
  give no ``output.weight`` unless ``lm_head`` is quantized (refused for Gemma, whose
  llama.cpp architecture has no output layer);
* hyperparameters (context length, heads, KV heads, head size, rope theta and scaling,
  RMS-norm epsilon, the family's soft-caps and sliding window) from ``model.config``; the
  tokenizer (byte-level BPE or SentencePiece, see :mod:`lowbit.export.gguf_vocab`) from a
  transformers tokenizer. Without one, a vocabulary-less file
  (``tokenizer.ggml.model = "none"``) is written: llama.cpp runs it on token ids.

GGUF stores weights only: activation and KV-cache quantizers are not exported (a warning
says so); llama.cpp quantizes activations its own way (to Q8_0/Q8_K blocks for quantized
matmuls on CPU), so its outputs differ slightly from lowbit's fake-quantized model.

Rotated models (:mod:`lowbit.algorithms.rotate`): offline rotations are plain weights; an
online rotation (:mod:`lowbit.nn.rotation`) is a ConfigError naming its module, as
llama.cpp's graph has no operation for it.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.adapters import facts, family
from lowbit.adapters.gguf_archs import GGUF_ARCHS, GgufArch
from lowbit.adapters.moe_export import GGUF_MOE_ARCHS
from lowbit.errors import ConfigError
from lowbit.export import gguf_moe, gguf_requant
from lowbit.export.base import weight_qtensor
from lowbit.export.gguf_types import NotExact, ggml_type_for, to_blocks
from lowbit.export.gguf_vocab import write_vocab
from lowbit.nn.modules import QuantMixin
from lowbit.nn.utils import quantizers
from lowbit.options import accepted_options, reject_unknown

FILENAME = "model.gguf"
FLOAT_TYPES, QUANT_TYPES = gguf_requant.FLOAT_TYPES, gguf_requant.QUANT_TYPES
SUPPORTED = (
    "Q8_0 (int2..int8 symmetric), Q4_0 (int2..int4 symmetric), Q5_0 (int5 symmetric), "
    "Q4_1/Q5_1 (4/5-bit affine), MXFP4 (mxfp4), each with one scale per 32 input values "
    "(per-tensor, per-channel, or groups of a multiple of 32) that is a float16 number "
    "(scale_format: fp16), e.g. the presets gguf-q8_0 and gguf-q4_0; and every gguf_* "
    "spec (Q2_K..Q6_K, IQ4_NL, IQ4_XS, NVFP4: the gguf-q4_k_m-style presets)"
)


#: transformers model_type -> llama.cpp architecture (see lowbit.adapters.gguf_archs)
ARCHS = GGUF_ARCHS


def qk_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp wants for a q/k projection with ``n_head`` heads.

    ``w_gguf = w[qk_rows(...)]`` is ``convert_hf_to_gguf.py``'s ``permute``: within each
    head, the two rotary halves are interleaved.
    """
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(n_rows)


# --- export ------------------------------------------------------------------------------
def export(model: nn.Module, out_dir: Path, tokenizer=None, float_type: str = "f32",
           embedding_type: str | None = None, output_type: str | None = None,
           allow_requantize: bool = False, requantize_type: str = "nearest",
           tokenizer_pre: str | None = None, name: str | None = None, **unknown) -> None:
    """Write ``model`` (a transformers causal LM of a family in
    :data:`lowbit.adapters.gguf_archs.GGUF_ARCHS`, the multimodal Gemma-3's text tower, or a
    Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE one with its experts split by lowbit.quantize) as
    ``out_dir/model.gguf``. See the module documentation for the options; any other option
    is a ConfigError naming it."""
    reject_unknown(unknown, "export format 'gguf'", accepted_options(export, ("model", "out_dir")))
    import gguf

    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"float_type {float_type!r}; expected one of: {', '.join(FLOAT_TYPES)}")
    embedding_type = gguf_requant.type_option(embedding_type, "embedding_type")
    output_type = gguf_requant.type_option(output_type, "output_type")
    if requantize_type != "nearest":
        requantize_type = gguf_requant.type_option(requantize_type, "requantize_type",
                                                   "'nearest', ")
    _refuse_online_rotations(model)
    mix_emb, mix_out, mix_ftype = gguf_requant.mix_types(model)
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "model_type"):
        raise ConfigError("GGUF export needs a transformers causal LM (a model with .config)")
    moe = gguf_moe.moe_arch(model, cfg.model_type)
    arch = ARCHS.get(cfg.model_type) if moe is None else \
        GgufArch(moe.arch, permute_qk=moe.permute_qk)
    if arch is None:
        raise ConfigError(f"GGUF export supports model types {', '.join(ARCHS)} and the MoE "
                          f"families {', '.join(GGUF_MOE_ARCHS)}; got {cfg.model_type!r}")
    mcfg = cfg
    cfg = facts.text_config(model)  # a multimodal class: its text tower, as llama.cpp runs it
    _check_family(arch, cfg)
    _check_ignored(model, arch)
    _warn_activation_quantizers(model)
    tied = _is_tied(model, cfg)
    if tied:  # llama.cpp: a tied token_embd takes the output type (llama_tensor_get_type)
        emb_type = embedding_type or output_type or mix_emb or float_type
    else:
        emb_type = embedding_type or mix_emb or float_type
    out_type = output_type or mix_out or float_type
    tensors = _tensors(model, cfg, arch, float_type, emb_type, out_type, allow_requantize,
                       requantize_type, output_type)
    tensors += _rope_tensors(cfg)
    writer = gguf.GGUFWriter(Path(out_dir) / FILENAME,
                             gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.arch)])
    _write_hparams(writer, model, mcfg, cfg, arch, name,
                   _file_type(tensors, float_type, mix_ftype))
    if moe is not None:
        gguf_moe.write_moe_hparams(writer, model, cfg, moe)
    write_vocab(writer, tokenizer, cfg.vocab_size, tokenizer_pre)
    for tname, arr, qtype in tensors:
        writer.add_tensor(tname, arr, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _refuse_online_rotations(model: nn.Module) -> None:
    """ConfigError naming the first online rotation (:mod:`lowbit.nn.rotation`): llama.cpp's
    graph has no operation that multiplies an activation by a stored matrix. Offline
    rotations (folded into the weights) export as plain weights."""
    from lowbit.nn.rotation import online_rotations

    rots = online_rotations(model)
    if rots:
        name, spec = next(iter(rots.items()))
        raise ConfigError(
            f"GGUF has no operation for an online rotation ({name}: {spec['where']} rotation, "
            f"{spec['kind']} {spec['size']}"
            f"{'' if spec.get('block') is None else ', block ' + str(spec['block'])}; "
            f"{len(rots)} in the model); recipes with only offline rotations (rotate r1/r2, "
            "no r3/r4/block) export; or save with format='native' or 'compressed-tensors'")


def _check_family(arch: GgufArch, cfg) -> None:
    """ConfigError when ``cfg`` contradicts what llama.cpp hard-codes for ``arch`` (it would
    run a different model)."""
    where = f"GGUF export ({arch.arch.lower()})"
    for f in arch.no_softcaps:
        if getattr(cfg, f, None) is not None:
            raise ConfigError(f"{where}: config.{f} = {getattr(cfg, f)}; llama.cpp's "
                              f"{arch.arch.lower()} architecture has no such soft-capping")
    for f in arch.softcaps if arch.softcaps_required else ():
        if getattr(cfg, f, None) is None:
            raise ConfigError(f"{where}: config.{f} is None; llama.cpp applies its default "
                              "soft-capping when the file has none (no way to switch it off)")
    hd = getattr(cfg, "head_dim", None)
    if arch.head_dim_from_heads and hd is not None and \
            hd != cfg.hidden_size // cfg.num_attention_heads:
        raise ConfigError(f"{where}: config.head_dim = {hd}; llama.cpp's converter drops it "
                          f"and uses hidden_size / num_attention_heads = "
                          f"{cfg.hidden_size // cfg.num_attention_heads}")
    if arch.gemma_attn_scale:
        hd = facts.head_dim(cfg)
        want = cfg.hidden_size // cfg.num_attention_heads \
            if cfg.num_hidden_layers in arch.big_layers else hd
        got = getattr(cfg, "query_pre_attn_scalar", None)
        if got is not None and got != want:
            raise ConfigError(f"{where}: config.query_pre_attn_scalar = {got}, but llama.cpp "
                              f"scales attention by 1/sqrt({want}) for this shape (head_dim "
                              f"{hd}, {cfg.num_hidden_layers} layers); expected {want}")
    if arch.swa_period is not None and getattr(cfg, "sliding_window", None):
        p = arch.swa_period
        want = ["sliding_attention" if i % p < p - 1 else "full_attention"
                for i in range(cfg.num_hidden_layers)]
        got = list(getattr(cfg, "layer_types", None) or want)
        if got != want:
            raise ConfigError(f"{where}: config.layer_types {got} differ from llama.cpp's "
                              f"fixed pattern (sliding except every {p}th layer): {want}")
        rp = getattr(cfg, "rope_parameters", None) or {}
        local = rp.get("sliding_attention") if isinstance(rp, dict) else None
        if arch.swa_rope_theta is not None and local is not None:
            kind = str(local.get("rope_type", "default"))
            theta = float(local.get("rope_theta", arch.swa_rope_theta))
            if kind != "default" or theta != arch.swa_rope_theta:
                raise ConfigError(f"{where}: sliding-window layers use rope {kind} with base "
                                  f"{theta}; llama.cpp fixes them at default rope, base "
                                  f"{arch.swa_rope_theta}")


def _check_ignored(model: nn.Module, arch: GgufArch) -> None:
    """ConfigError for a soft-cap the file would carry (llama.cpp applies it) that the
    family's transformers forward ignores (:func:`lowbit.adapters.facts.ignored_config`:
    the multimodal Gemma-3's ``final_logit_softcapping``): the two would disagree."""
    ignored = facts.ignored_config(model)
    for f in arch.softcaps:
        if f in ignored:
            raise ConfigError(f"GGUF export ({arch.arch.lower()}): config.{f} = {ignored[f]} "
                              f"is set, but {type(model).__name__}'s transformers forward "
                              f"does not apply it (declared by adapter {family(model)}), while "
                              f"llama.cpp would; unset it to export what transformers runs")


def _warn_activation_quantizers(model: nn.Module) -> None:
    names = [n for n, q in quantizers(model) if q.role != "weight" and q.is_enabled]
    if names:
        warnings.warn(f"GGUF stores weights only: {len(names)} activation/KV-cache "
                      f"quantizers (e.g. {names[0]}) are not exported; llama.cpp quantizes "
                      "activations its own way", stacklevel=3)


def _is_tied(model: nn.Module, cfg) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None:
        return bool(getattr(cfg, "tie_word_embeddings", False))
    return head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()


def _tensors(model, cfg, arch, float_type, emb_type, out_type, allow_requantize,
             requantize_type, output_option=None):
    """[(gguf name, numpy array, ggml type or None)] for every tensor of ``model``."""
    import gguf

    n_layers = cfg.num_hidden_layers
    # the family's norms scale by 1 + w (the adapter's declaration; measured when undeclared)
    plus_one = facts.norm_offset(model, measure=True) == 1.0
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.arch), n_layers)
    modules = dict(model.named_modules())
    tied = _is_tied(model, cfg)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    out, inexact, requantized, widened, file_quantized = [], [], [], [], []
    experts = gguf_moe.moe_experts(model)
    out += gguf_moe.expert_tensors(model, tmap, float_type, allow_requantize, requantize_type,
                                   _encode, _decode, inexact, requantized, widened)
    seen = {n for n, _, _ in out}
    towers, tower_q = Counter(), Counter()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, mod in modules.items() if mod is head), None)
    for key, t in model.state_dict(keep_vars=False).items():
        if "_quantizer." in key or key.endswith("inv_freq") or \
                gguf_moe.is_expert_key(key, experts):
            continue
        mod_name, pname = key.rsplit(".", 1)
        m = modules.get(mod_name)
        quantized = isinstance(m, QuantMixin) and pname == "weight" and \
            m.weight_quantizer.is_enabled
        tower = next((p for p in arch.other_towers if key.startswith(p)), None)
        if tower is not None:  # llama.cpp reads it from a separate mmproj file
            towers[tower.rstrip(".")] += 1
            tower_q[tower.rstrip(".")] += int(quantized)
            continue
        hf_key = key
        if arch.text_prefix is not None and key.startswith(arch.text_prefix):
            hf_key = "model." + key[len(arch.text_prefix):]
        gname = tmap.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if gname is None and mod_name == head_name:  # an arch with no output tensor
            gname = "output.weight"
        if gname is None:
            raise ConfigError(f"GGUF export: no llama.cpp tensor name for {key!r} "
                              f"(architecture {arch.arch.lower()})")
        if gname == "output.weight" and tied and not quantized:
            continue  # llama.cpp falls back to token_embd
        if gname == "output.weight" and arch.output_is_embedding:
            raise ConfigError(f"GGUF export: llama.cpp's {arch.arch.lower()} computes the "
                              f"logits with the token embedding, but {key} is "
                              f"{'quantized' if quantized else 'not tied to it'}; exclude "
                              "lm_head from quantization (e.g. exclude: ['lm_head'])")
        if gname in seen:
            raise ConfigError(f"GGUF export: two tensors map to {gname!r} (second: {key})")
        seen.add(gname)
        rows = None
        if arch.permute_qk and gname.split(".")[-2] in ("attn_q", "attn_k"):
            heads = n_head if gname.split(".")[-2] == "attn_q" else n_kv
            rows = qk_rows(t.shape[0], heads)
        if quantized:
            qt = weight_qtensor(m)
            if gname == "output.weight" and output_option is not None:
                raise ConfigError(f"GGUF export: output_type {output_option!r} applies to a "
                                  f"float output head, but {mod_name} is quantized "
                                  f"({qt.spec.short()}); exclude it from quantization or "
                                  "drop output_type")
            try:
                arr, kind = to_blocks(qt, rows)
                if kind != ggml_type_for(qt):
                    widened.append((mod_name, ggml_type_for(qt), kind))
                out.append((gname, arr, getattr(gguf.GGMLQuantizationType, kind)))
                continue
            except NotExact as e:
                if not allow_requantize:
                    inexact.append(f"{mod_name} ({qt.spec.short()}): {e}")
                    continue
                with torch.no_grad():
                    w = m.weight_2d(m.quantized_weight()).detach().float().cpu()
                if requantize_type == "nearest":
                    r = gguf_requant.nearest(qt, w, rows, gname)
                    requantized.append((mod_name, r.kind, r.max_change, r.rms_change,
                                        r.codes_kept))
                    out.append((gname, r.arr, getattr(gguf.GGMLQuantizationType, r.kind)))
                    continue
                w = w[rows] if rows is not None else w
                arr, qtype = _encode(w, requantize_type, gname)
                diff = _decode(arr, qtype) - w
                requantized.append((mod_name, requantize_type.upper(), float(diff.abs().max()),
                                    float(diff.pow(2).mean().sqrt()), None))
                out.append((gname, arr, qtype))
                continue
        data = t.detach().float().cpu()
        if data.ndim == 2 and hf_key.endswith(arch.transposed or ("\0",)):
            data = data.t()  # Conv1D [in, out] -> [out, in]
        if rows is not None:
            data = data[rows]
        if plus_one and hf_key.endswith("norm.weight"):
            data = data + 1.0  # the model computes x * (1 + w); llama.cpp x * w
        if data.ndim < 2:
            out.append((gname, data.numpy().astype(np.float32), None))
        elif gname.split(".")[-2] in gguf_moe.ROUTER_TENSORS:  # routers: F32, as llama.cpp
            out.append((gname, data.numpy().astype(np.float32), None))
        else:
            kind = {"token_embd.weight": emb_type, "output.weight": out_type}.get(gname,
                                                                                float_type)
            arr, qtype = _encode(data, kind, gname)
            out.append((gname, arr, qtype))
            if kind not in FLOAT_TYPES:
                file_quantized.append((gname, kind.upper()))
    if towers:
        warnings.warn("GGUF export wrote the text model only: llama.cpp reads "
                      + ", ".join(f"{p} ({n} tensors, {tower_q[p]} quantized)"
                                  for p, n in towers.items())
                      + " from a separate mmproj file, which lowbit does not write",
                      stacklevel=3)
    if inexact:
        raise ConfigError(
            f"GGUF export: layer {inexact[0]}"
            + (f" (and {len(inexact) - 1} more layers)" if len(inexact) > 1 else "")
            + f". Exact GGUF types: {SUPPORTED}. Pass allow_requantize=True to requantize "
            "the fake-quantized weights instead (not exact)")
    if widened:
        warnings.warn(
            f"GGUF export stored {len(widened)} layers (e.g. {widened[0][0]}) as "
            f"{widened[0][2]} instead of {widened[0][1]}: exact, but larger (the {widened[0][1]} "
            "offset d*(qmin - zero_point) is not a float16 number)", stacklevel=3)
    if requantized:
        gguf_requant.warn_requantized(requantized, requantize_type)
    if file_quantized:
        warnings.warn(
            "GGUF export quantized " + ", ".join(f"{n} to {k}" for n, k in file_quantized)
            + " in the file (lowbit.core, data-free weighting), while the in-memory model "
            "keeps them in float: llama.cpp's logits differ slightly from lowbit's",
            stacklevel=3)
    return out


def _encode(w: torch.Tensor, kind: str, gname: str):
    """A float matrix (2-D, or experts stacked 3-D) as ``kind``: f32/f16/bf16 (bf16 by
    ``gguf.quants``, a plain conversion) or a ggml type quantized by lowbit.core
    (:func:`lowbit.export.gguf_requant.quantize_matrix`)."""
    import gguf

    a = np.ascontiguousarray(w.float().numpy())
    if kind == "f32":
        return a, None
    if kind == "f16":
        return a.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    if kind == "bf16":
        return gguf.quants.quantize(a, qtype), qtype
    if w.ndim == 3:  # stacked experts
        return np.stack([gguf_requant.quantize_matrix(x, kind.upper(), gname)[0]
                         for x in w.float()]), qtype
    return gguf_requant.quantize_matrix(w.float(), kind.upper(), gname)[0], qtype


def _decode(arr: np.ndarray, qtype) -> torch.Tensor:
    import gguf

    if qtype is None:  # f32 / f16 arrays
        return torch.from_numpy(arr.astype(np.float32))
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(arr, qtype), dtype=np.float32))


def _rope_parameters(cfg) -> dict:
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        return dict(rp["full_attention"])  # per layer type (Gemma-3): llama.cpp's global rope
    if isinstance(rp, dict) and rp:
        return dict(rp)
    rp = dict(getattr(cfg, "rope_scaling", None) or {})
    rp.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return rp


def _rope_tensors(cfg) -> list:
    """llama3-style rope scaling becomes a ``rope_freqs`` tensor (as convert_hf_to_gguf)."""
    import math

    rp = _rope_parameters(cfg)
    rtype = str(rp.get("rope_type", rp.get("type", "default"))).lower()
    if rtype in ("longrope", "su"):  # Phi-3: per-dimension factors, as convert_hf_to_gguf
        import gguf

        rot = facts.rotary_dim(cfg)
        out = []
        for which, kind in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            f = rp.get(which)
            if f is None or len(f) != rot // 2:
                raise ConfigError(f"GGUF export: rope {which} has "
                                  f"{None if f is None else len(f)} values; expected {rot // 2}")
            out.append((gguf.TENSOR_NAMES[kind] + ".weight", np.asarray(f, np.float32), None))
        return out
    if rtype != "llama3":
        return []
    base, dim = rp.get("rope_theta", 10000.0), facts.head_dim(cfg)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.asarray(out, dtype=np.float32), None)]


def _file_type(tensors, float_type: str, mix_ftype: str | None = None) -> int:
    """``general.file_type``: the mix's (``MOSTLY_Q4_K_M``...) when the model was quantized
    with a GGUF mix, else the most common type of the weight matrices."""
    import gguf

    LFT = gguf.LlamaFileType
    if mix_ftype is not None and hasattr(LFT, "MOSTLY_" + mix_ftype.upper()):
        return getattr(LFT, "MOSTLY_" + mix_ftype.upper())
    kinds = Counter(q.name if q is not None else ("F16" if a.dtype == np.float16 else "F32")
                    for n, a, q in tensors
                    if n not in ("token_embd.weight", "output.weight") and
                    (q is not None or a.ndim == 2))
    top = kinds.most_common(1)[0][0] if kinds else float_type.upper()
    return {"F32": LFT.ALL_F32, "F16": LFT.MOSTLY_F16, "BF16": LFT.MOSTLY_BF16,
            "Q8_0": LFT.MOSTLY_Q8_0, "Q4_0": LFT.MOSTLY_Q4_0, "Q4_1": LFT.MOSTLY_Q4_1,
            "Q5_0": LFT.MOSTLY_Q5_0, "Q5_1": LFT.MOSTLY_Q5_1,
            "MXFP4": LFT.MOSTLY_MXFP4_MOE, "Q2_K": LFT.MOSTLY_Q2_K,
            "Q3_K": LFT.MOSTLY_Q3_K_M, "Q4_K": LFT.MOSTLY_Q4_K_M, "Q5_K": LFT.MOSTLY_Q5_K_M,
            "Q6_K": LFT.MOSTLY_Q6_K, "IQ4_NL": LFT.MOSTLY_IQ4_NL, "IQ4_XS": LFT.MOSTLY_IQ4_XS,
            }.get(top, getattr(LFT, "MOSTLY_" + top, LFT.ALL_F32))


def _write_hparams(w, model, mcfg, cfg, arch: GgufArch, name, file_type) -> None:
    """Hyperparameters of text config ``cfg`` (``mcfg``: the model's own config, for its
    name) as llama.cpp's converter writes them for ``arch``."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or Path(str(getattr(mcfg, "_name_or_path", "") or "")).name or
               type(model).__name__)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    if arch.gpt2_style:  # learned positions, LayerNorm, MLP 4 * n_embd unless n_inner
        w.add_feed_forward_length(getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_layer_norm_eps(float(cfg.layer_norm_epsilon))
        rtype = "none"
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or
                            cfg.num_attention_heads)
        hd = facts.head_dim(cfg)
        w.add_key_length(hd)
        w.add_value_length(hd)
        rtype = _write_rope(w, cfg, arch)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    for f in arch.softcaps:
        if getattr(cfg, f, None) is not None:
            getattr(w, f"add_{f}")(float(getattr(cfg, f)))
    for f, method in arch.scales:
        if getattr(cfg, f, None):
            getattr(w, method)(float(getattr(cfg, f)))
    sw = getattr(cfg, "sliding_window", None)
    if sw is not None and arch.swa_period is not None:
        w.add_sliding_window(int(sw))
    elif arch.sliding_window_always:
        w.add_sliding_window(int(sw or 0))
    if arch.rope_orig_ctx and rtype != "yarn" and \
            getattr(cfg, "original_max_position_embeddings", None):
        w.add_rope_scaling_orig_ctx_len(int(cfg.original_max_position_embeddings))
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_rope(w, cfg, arch: GgufArch) -> str:
    """Rotary hyperparameters; returns the rope type."""
    import gguf

    rp = _rope_parameters(cfg)
    w.add_rope_dimension_count(facts.rotary_dim(cfg))
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    rtype = str(rp.get("rope_type", rp.get("type", "default"))).lower()
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    elif rtype in ("longrope", "su") and arch.rope_orig_ctx:  # Phi-3 128k, Phi-3.5
        orig = int(rp.get("original_max_position_embeddings") or
                   cfg.original_max_position_embeddings)
        scale = cfg.max_position_embeddings / orig
        factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
        given = rp.get("attention_factor")
        if given is not None and not math.isclose(float(given), factor, rel_tol=1e-6):
            raise ConfigError(f"GGUF export: rope attention_factor {given}; llama.cpp uses "
                              f"sqrt(1 + ln(scale)/ln(original context)) = {factor:.6g}")
        w.add_rope_scaling_attn_factors(factor)
    elif rtype not in ("default", "llama3"):
        raise ConfigError(f"GGUF export: rope type {rtype!r} is not supported (default, "
                          "linear, yarn, llama3, and longrope for phi3 are)")
    return rtype
