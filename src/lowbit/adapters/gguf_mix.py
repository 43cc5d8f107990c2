"""llama-quantize's mixes: which ggml type each tensor of a model gets for a file type (Q4_K_M...).

llama.cpp's ``llama-quantize MODEL.gguf OUT.gguf Q4_K_M`` does not give every tensor Q4_K: its
``llama_tensor_get_type`` (src/llama-quant.cpp) raises some tensors to more bits (``attn_v``
and ``ffn_down`` of a third of the layers to Q6_K for Q4_K_M, the output layer to Q6_K...)
and ``tensor_type_fallback`` swaps a type whose block (256 for K types) does not divide the
tensor's row length for a 32-block type (Q4_K -> Q5_0...). This module reproduces those rules
for the file types whose tensor types lowbit can write (the K types, IQ4_NL/IQ4_XS and the
32-block legacy types); each rule cites the llama.cpp condition it reproduces.

>>> tensor_type("blk.0.attn_v.weight", 576, "q4_k_m", n_layers=30)
'Q8_0'
>>> tensor_type("blk.0.ffn_down.weight", 1536, "q4_k_m", n_layers=30)
'Q6_K'

:func:`plan` gives the whole model's types (module name -> type, and the types of
``token_embd``/``output``, which lowbit's model keeps in float and the exporter quantizes).
Type names are the ``gguf`` package's (``"Q4_K"``; ``"F16"`` when nothing fits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from lowbit.adapters.gguf_names import GgufTensor, gguf_arch_name, gguf_tensor_names
from lowbit.errors import ConfigError

#: llama-quantize file type (lowercase, as lowbit presets spell it) -> its default tensor type
#: (llama.cpp ``llama_ftype_get_default_type``). Only the file types whose rules produce types
#: lowbit writes; the IQ1/IQ2/IQ3/TQ file types are refused.
FTYPES: dict[str, str] = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
    "q2_k": "Q2_K", "q2_k_s": "Q2_K",
    "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K",
    "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K",
    "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS",
}
#: llama-quantize's aliases (its QUANT_OPTIONS: "Q3_K" is Q3_K_M, ...)
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
#: ggml block size (elements per block along a row) of each type lowbit writes
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32,
         "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
         "F16": 1, "F32": 1, "BF16": 1}
#: what ``--output-tensor-type`` / ``--token-embedding-type`` may name
TENSOR_TYPES = tuple(BLOCK)
#: tensor_type_fallback: the 32-block type replacing a 256-block type that does not fit
FALLBACK = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0",
            "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def canonical_ftype(ftype: str) -> str:
    """``ftype`` in lowbit's spelling (``"q4_k_m"``); accepts llama-quantize's (``"Q4_K_M"``,
    aliases ``Q4_K``...). ConfigError naming the accepted ones otherwise."""
    f = str(ftype).lower()
    f = ALIASES.get(f, f)
    if f not in FTYPES:
        raise ConfigError(f"GGUF mix {ftype!r} is not supported; expected one of: "
                          f"{', '.join(FTYPES)} (llama-quantize's IQ1/IQ2/IQ3/TQ mixes use "
                          "types lowbit does not write)")
    return f


def canonical_type(t: str, what: str) -> str:
    """A ggml tensor type name (``"q6_k"`` -> ``"Q6_K"``); ConfigError naming ``what``."""
    u = str(t).upper()
    if u not in BLOCK:
        raise ConfigError(f"{what} {t!r}; expected one of: {', '.join(TENSOR_TYPES)}")
    return u


def category(name: str) -> str:
    """llama.cpp ``tensor_get_category``: the broad role of GGUF tensor ``name`` (first match
    in its order: output, token_embd, attn_qkv, attn_kv_b, attn_v, attn_k, attn_q,
    attn_output, ffn_up, ffn_gate, ffn_down, other)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight",
                "attn_q.weight", "attn_output.weight"):
        if key in name:
            return key[:-7]
    for key in ("ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key
    return "other"


def is_attn_v(cat: str) -> bool:
    """llama.cpp ``category_is_attn_v``: attn_v, attn_qkv and attn_kv_b count as ``attn_v``."""
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def quantizable(name: str) -> bool:
    """llama.cpp ``tensor_allows_quantization`` for the tensors lowbit's families have:
    names ending ``weight`` that are not norms, routers (``ffn_gate_inp``) or learned
    positions (``position_embd``). (Dimensions < 2 are the caller's: only matrices come here.)"""
    return name.endswith("weight") and "_norm.weight" not in name and \
        "ffn_gate_inp.weight" not in name and "position_embd" not in name


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits`` lambda: the first and last eighth of the layers and every
    third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or \
        (i_layer - n_layers // 8) % 3 == 2


def fallback(t: str, n_cols: int) -> tuple[str, str | None]:
    """llama.cpp ``tensor_type_fallback``: ``(type, why or None)``. A 256-block type whose
    block does not divide ``n_cols`` becomes its 32-block substitute (:data:`FALLBACK`), and
    anything still not dividing ``n_cols`` (and a 32-block type that does not) becomes F16."""
    b = BLOCK[t]
    if n_cols % b == 0:
        return t, None
    new = FALLBACK.get(t, t)  # a 32-block type has no smaller block: the F16 check below
    if n_cols % BLOCK[new] != 0:
        new = "F16"
    return new, f"{n_cols} columns not a multiple of {b} ({t}) -> {new}"


@dataclass(frozen=True)
class MixModel:
    """What llama.cpp's rules read of the model: ``n_layers`` (hparams.n_layer_all),
    ``n_gqa`` (heads / KV heads), ``n_expert`` (0 or 1: dense), ``arch`` (llama.cpp
    architecture, lowercase), ``tied`` (no ``output.weight`` in the file), ``is_70b``
    (llama.cpp's LLM_TYPE_70B: llama, 80 layers, grouped KV heads), ``has_imatrix``."""

    n_layers: int
    n_gqa: int = 1
    n_expert: int = 0
    arch: str = "llama"
    tied: bool = True
    is_70b: bool = False
    has_imatrix: bool = False


def _mix_type(name: str, cat: str, n_cols: int, ftype: str, m: MixModel, i_wv: int,
              n_wv: int, i_layer: int) -> tuple[str, str]:
    """llama.cpp ``llama_tensor_get_type_impl`` for one tensor (before the fallback):
    ``(type, rule)``. ``i_wv``/``n_wv``: attn_v-like tensors before this one / in all;
    ``i_layer``: the layer of ffn tensors (llama.cpp's i_ffn_down counter, or the layer in the
    name with experts)."""
    new = FTYPES[ftype]
    falcon = m.arch == "falcon"
    n = m.n_layers
    # OUTPUT, or TOKEN_EMBD when the embeddings are tied: Q8_0 when the default type's block
    # does not divide the row (or falcon), else Q6_K unless the default is Q8_0
    if cat == "output" or (m.tied and cat == "token_embd"):
        if falcon or n_cols % BLOCK[new] != 0:
            return "Q8_0", "output/tied embedding: default type's block does not fit -> Q8_0"
        if new != "Q8_0":
            return "Q6_K", "output/tied embedding -> Q6_K"
        return new, "output/tied embedding: Q8_0 stays"
    if cat == "token_embd":
        return new, "untied token embedding: the file type's default"
    if is_attn_v(cat):
        rule = "default"
        if ftype == "q2_k":
            new, rule = ("Q4_K", "attn_v, Q2_K, n_gqa >= 4") if m.n_gqa >= 4 else \
                ("Q3_K", "attn_v, Q2_K, n_gqa < 4")
        elif ftype == "q2_k_s" and m.n_gqa >= 4:
            new, rule = "Q4_K", "attn_v, Q2_K_S, n_gqa >= 4"
        elif ftype == "q3_k_m":
            new, rule = ("Q5_K", "attn_v, Q3_K_M, first 2 attn_v") if i_wv < 2 else \
                ("Q4_K", "attn_v, Q3_K_M")
        elif ftype == "q3_k_l":
            new, rule = "Q5_K", "attn_v, Q3_K_L"
        elif ftype in ("iq4_nl", "iq4_xs") and m.n_gqa >= 4:
            new, rule = "Q5_K", "attn_v, IQ4, n_gqa >= 4"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_wv, n_wv):
            new, rule = "Q6_K", "attn_v, Q4_K_M/Q5_K_M, use_more_bits(i_attention_wv)"
        elif ftype == "q4_k_s" and i_wv < 4:
            new, rule = "Q5_K", "attn_v, Q4_K_S, first 4 attn_v"
        if m.is_70b and new in ("Q3_K", "Q4_K"):
            new, rule = "Q5_K", "attn_v, 70B model: Q3_K/Q4_K -> Q5_K"
        if m.n_expert == 8:
            new, rule = "Q8_0", "attn_v, 8 experts -> Q8_0"
        return new, rule
    if cat == "attn_k":
        if m.n_expert == 8:
            return "Q8_0", "attn_k, 8 experts -> Q8_0"
        return new, "default"
    if cat == "ffn_down":
        if ftype == "q2_k":
            return "Q3_K", "ffn_down, Q2_K -> Q3_K"
        if ftype == "q2_k_s":
            return ("Q4_K", "ffn_down, Q2_K_S, first eighth") if i_layer < n // 8 else \
                (new, "default")
        if ftype == "q3_k_m":
            if i_layer < n // 16:
                return "Q5_K", "ffn_down, Q3_K_M, first sixteenth"
            if not falcon or use_more_bits(i_layer, n):
                return "Q4_K", "ffn_down, Q3_K_M"
            return "Q3_K", "ffn_down, Q3_K_M, falcon"
        if ftype == "q3_k_l":
            return ("Q4_K", "ffn_down, Q3_K_L, falcon") if falcon else \
                ("Q5_K", "ffn_down, Q3_K_L")
        if ftype == "q4_k_m":
            if falcon:
                if i_layer < n // 16:
                    return "Q6_K", "ffn_down, Q4_K_M, falcon, first sixteenth"
                return ("Q5_K", "ffn_down, Q4_K_M, falcon, use_more_bits") if \
                    use_more_bits(i_layer, n) else (new, "default")
            if use_more_bits(i_layer, n):
                return "Q6_K", "ffn_down, Q4_K_M, use_more_bits(layer)"
            return new, "default"
        if i_layer < n // 8 and ftype in ("iq4_nl", "iq4_xs") and not m.has_imatrix:
            return "Q5_K", "ffn_down, IQ4 without imatrix, first eighth"
        if ftype == "q5_k_m" and use_more_bits(i_layer, n):
            return "Q6_K", "ffn_down, Q5_K_M, use_more_bits(layer)"
        if ftype == "q4_k_s" and not falcon and i_layer < n // 8:
            return "Q5_K", "ffn_down, Q4_K_S, first eighth"
        if ftype in ("q4_0", "q5_0") and m.has_imatrix and i_layer < n // 8:
            t = "Q4_1" if ftype == "q4_0" else "Q5_1"
            return t, f"ffn_down, {ftype.upper()} with imatrix, first eighth -> {t}"
        return new, "default"
    if cat == "attn_output":
        if not falcon:
            if m.n_expert == 8:
                if ftype in ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m",
                             "iq4_xs"):
                    return "Q5_K", "attn_output, 8 experts -> Q5_K"
                return new, "default"
            t = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(ftype)
            if t is not None:
                return t, f"attn_output, {ftype.upper()} -> {t}"
        elif ftype == "q3_k_l":
            return "Q4_K", "attn_output, Q3_K_L, falcon"
        return new, "default"
    if cat == "attn_qkv":  # (reached only through the attn_v branch above, as in llama.cpp)
        return new, "default"
    return new, "default"


def tensor_type(gguf_name: str, n_cols: int, ftype: str, n_layers: int, *, n_gqa: int = 1,
                n_expert: int = 0, arch: str = "llama", tied: bool = True,
                has_imatrix: bool = False, is_70b: bool = False,
                i_attention_wv: int | None = None, n_attention_wv: int | None = None,
                output_type: str | None = None, embedding_type: str | None = None,
                pure: bool = False) -> str:
    """The ggml type llama-quantize gives tensor ``gguf_name`` (``blk.3.ffn_down.weight``)
    with rows of ``n_cols`` elements (ggml ``ne[0]``) in file type ``ftype`` (``"q4_k_m"``).

    ``n_layers``: the model's layer count; ``n_gqa``: heads per KV head; ``n_expert``;
    ``arch``: llama.cpp architecture (lowercase); ``tied``: the file has no output.weight;
    ``has_imatrix``; ``is_70b`` (llama.cpp's 70B rule); ``i_attention_wv``/``n_attention_wv``:
    attn_v-like tensors before this one / in the model (default: the layer in the name /
    ``n_layers``, as in a model with one per layer); ``output_type``/``embedding_type``:
    llama-quantize's ``--output-tensor-type``/``--token-embedding-type``; ``pure``:
    ``--pure``. Returns e.g. ``"Q6_K"``; see :func:`tensor_type_why` for the rule."""
    return tensor_type_why(gguf_name, n_cols, ftype, MixModel(
        n_layers, n_gqa, n_expert, arch, tied, is_70b, has_imatrix), i_attention_wv,
        n_attention_wv, output_type, embedding_type, pure)[0]


def _layer(name: str) -> int | None:
    mo = re.match(r"blk\.(\d+)\.", name)
    return int(mo.group(1)) if mo else None


def tensor_type_why(gguf_name: str, n_cols: int, ftype: str, m: MixModel,
                    i_attention_wv: int | None = None, n_attention_wv: int | None = None,
                    output_type: str | None = None, embedding_type: str | None = None,
                    pure: bool = False, i_ffn: int | None = None) -> tuple[str, str]:
    """:func:`tensor_type` with the rule that chose it: ``(type, why)``. ``i_ffn``: llama.cpp's
    ffn counter for this tensor (default: the layer in the name)."""
    ftype = canonical_ftype(ftype)
    cat = category(gguf_name)
    # llama_tensor_get_type: --token-embedding-type / --output-tensor-type win outright
    for opt, what, c in ((embedding_type, "embedding_type", "token_embd"),
                         (output_type, "output_type", "output")):
        if opt is not None and cat == c:  # given types bypass the fallback, as in llama.cpp
            t = canonical_type(opt, what)
            if n_cols % BLOCK[t]:  # (llama-quantize stops when it quantizes the tensor)
                raise ConfigError(f"{what} {t}: {gguf_name} has rows of {n_cols} values, not "
                                  f"a multiple of {t}'s block of {BLOCK[t]}")
            return t, f"--{'token-embedding' if c == 'token_embd' else 'output-tensor'}-type"
    layer = _layer(gguf_name)
    if pure:  # --pure: no mix rules, the default type (still through the fallback)
        t, why = FTYPES[ftype], "--pure: the file type's default"
    else:
        if output_type is not None and m.tied and cat == "token_embd":
            # llama_tensor_get_type_impl: a tied embedding takes the output type (then the
            # fallback below, as llama.cpp)
            t, why = canonical_type(output_type, "output_type"), "tied: --output-tensor-type"
            t2, fb = fallback(t, n_cols)
            return t2, why if fb is None else f"{why}; fallback: {fb}"
        i_wv = i_attention_wv if i_attention_wv is not None else (layer or 0)
        n_wv = n_attention_wv if n_attention_wv is not None else m.n_layers
        if m.n_expert > 1 or i_ffn is None:  # layer_info: the name's layer with experts
            i_ffn = layer or 0
        t, why = _mix_type(gguf_name, cat, n_cols, ftype, m, i_wv, n_wv, i_ffn)
    t2, fb = fallback(t, n_cols)
    return t2, why if fb is None else f"{why}; fallback: {fb}"


@dataclass
class MixPlan:
    """The whole model's types. ``ftype``; ``modules``: ``{module: (gguf name, type, why)}``
    for every quantizable matrix that lowbit quantizes (linears, experts); ``token_embd``,
    ``output``: types for the exporter (``output`` None when the embeddings are tied and
    there is no output tensor); ``float_modules``: modules llama.cpp would keep F16 (no
    block type fits); ``fallbacks``: ``{module: why}`` of every tensor_type_fallback."""

    ftype: str
    modules: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    token_embd: str | None = None
    output: str | None = None
    float_modules: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def types(self) -> dict[str, str]:
        """``{module: type}`` of the planned modules."""
        return {k: v[1] for k, v in self.modules.items()}

    def as_dict(self) -> dict:
        """Plain dict for reports/JSON."""
        return {"ftype": self.ftype, "token_embd": self.token_embd, "output": self.output,
                "modules": {k: {"tensor": g, "type": t, "why": w}
                            for k, (g, t, w) in self.modules.items()},
                "float_modules": list(self.float_modules), "fallbacks": dict(self.fallbacks)}


def _sort_key(name: str):
    """llama.cpp's model loader order (``weight_name_comparer``): by the ``blk.N.`` layer (-1
    for the rest), then by name; llama-quantize visits tensors (and counts attn_v) so."""
    layer = _layer(name)
    return (-1 if layer is None else layer, name)


def mix_model(model: nn.Module, has_imatrix: bool = False) -> MixModel:
    """The :class:`MixModel` facts of a transformers model (text config for multimodal)."""
    from lowbit.adapters.facts import text_config

    cfg = text_config(model)
    arch = gguf_arch_name(model).lower()
    n_layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    names = gguf_tensor_names(model)
    tied = not any(t.name == "output.weight" for t in names.values()) or _tied(model)
    experts = {t.module.rsplit(".", 2)[0] for t in names.values() if t.expert}
    n_expert = 0
    if experts:
        n_expert = max(sum(1 for t in names.values() if t.expert and
                           t.module.rsplit(".", 2)[0] == e) for e in experts)
        n_expert //= max(1, len({t.module.rsplit(".", 1)[-1] for t in names.values()
                                 if t.expert}))
    return MixModel(n_layers, heads // kv if kv else 0, n_expert, arch, tied,
                    arch == "llama" and n_layers == 80 and heads != kv, has_imatrix)


def _tied(model: nn.Module) -> bool:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None or head is None:
        return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return head.weight is emb.weight


def plan(model: nn.Module, ftype: str, output_type: str | None = None,
         embedding_type: str | None = None, pure: bool = False,
         has_imatrix: bool = False) -> MixPlan:
    """llama-quantize's types for every matrix of ``model`` (see :class:`MixPlan`), visiting
    the tensors in llama.cpp's order to count the attn_v-like tensors as it does
    (``n_attention_wv`` from ``init_quantize_state_counters``, ``i_attention_wv`` running).
    ``output_type``/``embedding_type``/``pure``: llama-quantize's options; ``has_imatrix``:
    an importance matrix is used (it changes the IQ4 and Q4_0/Q5_0 ffn_down rules)."""
    ftype = canonical_ftype(ftype)
    if ftype == "q2_k_s" and not has_imatrix:
        raise ConfigError("GGUF mix q2_k_s needs an importance matrix (llama.cpp's "
                          "tensor_requires_imatrix): add the imatrix step")
    m = mix_model(model, has_imatrix)
    names = gguf_tensor_names(model)
    tensors: dict[str, list[GgufTensor]] = {}
    for t in names.values():
        tensors.setdefault(t.name, []).append(t)
    if m.tied:  # lowbit writes no output.weight for a tied, unquantized head
        tensors.pop("output.weight", None)
    n_wv = sum(1 for g in tensors if is_attn_v(category(g)))  # init_quantize_state_counters
    out = MixPlan(ftype)
    i_wv = 0
    ffn_counts = {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    for gname in sorted(tensors, key=_sort_key):
        ts = tensors[gname]
        # tensor_allows_quantization: ggml_n_dims >= 2 (a [n, 1] matrix, e.g. Qwen2-MoE's
        # shared-expert gate, counts as 1-D: ggml drops trailing dimensions of size 1)
        if not quantizable(gname) or (ts[0].n_rows == 1 and not ts[0].expert):
            continue
        cat = category(gname)
        t, why = tensor_type_why(gname, ts[0].n_cols, ftype, m, i_wv, n_wv, output_type,
                                 embedding_type, pure, ffn_counts.get(cat))
        if not pure and not (cat == "token_embd" and embedding_type is not None) and \
                not (cat == "output" and output_type is not None):
            if is_attn_v(cat):
                i_wv += 1
            if cat in ffn_counts:
                ffn_counts[cat] += 1
        if cat == "token_embd":
            out.token_embd = t
            continue
        if cat == "output":
            out.output = t
            continue
        for x in ts:
            if "fallback:" in why:
                out.fallbacks[x.module] = why.split("fallback: ", 1)[1]
            if t in ("F16", "F32", "BF16"):
                out.float_modules.append(x.module)
            else:
                out.modules[x.module] = (gname, t, why)
    return out


#: algorithm steps whose scales use calibration importance: a mix planned with them takes
#: llama.cpp's rules for a quantization with an importance matrix
IMPORTANCE_STEPS = ("imatrix", "gptq")


def expand(model: nn.Module, recipe):
    """``(recipe with the mix's targets, MixPlan)``: ``recipe.gguf_mix`` (a
    :class:`lowbit.config.recipe.GgufMix`) planned for ``model`` (after its experts are
    split) and turned into one target per type (``{pattern: [modules], weight: {format:
    gguf_<type>}}``) placed before the recipe's own targets, which still override. The
    importance-matrix rules are on when ``gguf_mix.imatrix`` is true or, when it is null,
    when the recipe has an ``imatrix`` or a ``gptq`` step (GPTQ searches each block's scales
    with the calibration data's importance, its Hessian diagonal, so the weights are as
    data-informed as llama-quantize's with ``--imatrix``)."""
    from lowbit.config.recipe import Recipe

    mix = recipe.gguf_mix
    has_imatrix = mix.imatrix if mix.imatrix is not None else \
        any(a.name in IMPORTANCE_STEPS for a in recipe.algorithms)
    p = plan(model, mix.ftype, mix.output_type, mix.embedding_type, mix.pure, has_imatrix)
    by_type: dict[str, list[str]] = {}
    for mod, (_, t, _) in p.modules.items():
        by_type.setdefault(t, []).append(mod)
    d = recipe.to_dict()
    d["targets"] = [{"pattern": mods, "weight": {"format": "gguf_" + t.lower()}}
                    for t, mods in by_type.items()] + d["targets"]
    return Recipe.parse(d, f"recipe {recipe.name} (gguf_mix {mix.ftype})"), p


__all__ = ["FTYPES", "expand", "ALIASES", "BLOCK", "FALLBACK", "MixModel", "MixPlan", "canonical_ftype",
           "canonical_type", "category", "fallback", "mix_model", "plan", "quantizable",
           "tensor_type", "tensor_type_why", "use_more_bits"]
