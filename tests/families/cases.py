"""The cells of the family matrix: each (family, path) pair, how it runs, what it checks.

A *family* is a tiny seeded model (``tests.tiny_models.build`` / ``tests.moe_models``);
a *path* is one thing a user does with it: quantize with a recipe, check the coverage, or
export and reload with the engine that reads the format. :func:`run_cell` runs one cell and
returns its *outcome*, a deterministic one-line string:

* ``yes``: it ran and the check passed;
* ``refused: <first line>``: lowbit raised a :class:`~lowbit.errors.ConfigError` (a clear
  refusal naming what is missing: a legitimate outcome);
* ``n/a: <why>``: nothing of lowbit's to test: the engine has no reader for the family's
  architecture, or the quantized model the cell starts from is not there;
* ``FAIL: <first line>``: any other exception, or a numeric disagreement: a bug.

Quantized models are cached per (family, recipe) for the process: the export cells share
the quantization they start from (never changed in place: cells that change a model work on
a deep copy).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import lowbit
from lowbit.errors import ConfigError
from tests.moe_models import MOE_FAMILIES, build_moe
from tests.tiny_models import DENSE_FAMILIES, build, calib_ids, group_over, loop_over

# "llama2_sp": a Llama with a Llama-2-shaped SentencePiece tokenizer (the GGUF columns
# write and read it back); the other rows' GGUF files carry no vocabulary
FAMILIES = ["llama", "llama2_sp"] + [f for f in DENSE_FAMILIES if f != "llama"] \
    + list(MOE_FAMILIES)
TOKENIZERS = {"llama2_sp": "llama2_tokenizer"}  # tests/export/tiny_tokenizers.py
CALIB = calib_ids(4, 16)          # calibration batches (tests.tiny_models)
IDS = calib_ids(1, 12, seed=7)    # the prompt every comparison runs
ONNX_IDS = calib_ids(1, 8, seed=7)
NEW_TOKENS = 8                    # greedy tokens FastDecoder and generate must agree on

# tolerances, as the per-format tests use them
CT_TOL = 1e-5       # compressed-tensors -> transformers: max |log-prob diff| (float32)
ONNX_TOL = 1e-5     # onnxruntime vs lowbit: max |logit diff| (tests/export/test_onnx.py)
GGUF_HF_TOL = 1e-4  # transformers' GGUF loader vs lowbit: max |diff| / max |logit|
FAST_TOL = 1e-5     # FastDecoder vs the model's forward: max |diff| / max |logit|
RTN_FACTOR = 1.5    # an int4 algorithm's output error vs round-to-nearest's
COVERAGE_MIN = 0.99  # quantized share of the non-embedding weights under int4-weight-only


class NotApplicable(Exception):
    """The cell has nothing of lowbit's to test (see the module doc)."""


class Mismatch(Exception):
    """A reader computes something else than lowbit's fake-quantized model."""


# --- models -------------------------------------------------------------------------------
RECIPES = {  # key -> (preset, overrides)
    "int4-gptq": ("int4-gptq", {}),
    "int4-awq": ("int4-awq", {}),
    "int8-smoothquant": ("int8-smoothquant", {}),
    "fp8+kv": ("fp8", {"kv_cache": "fp8"}),
    "fp8": ("fp8", {}),
    "int4-weight-only": ("int4-weight-only", {}),
    "gguf-q4_0": ("gguf-q4_0", {}),
}
GROUP = 32  # group size of the int4 recipes: the tiny models are 64 wide


def _group(preset: str) -> dict:
    """Group 32 where the recipe has groups; a layer it does not divide (the 16-wide
    low-rank projections of the tiny DeepSeek models) falls back as the recipe says."""
    kw = group_over(preset, GROUP)
    return {**kw, "group_policy": "fallback"} if kw else kw


_FLOAT: dict[str, torch.nn.Module] = {}
_QUANT: dict[tuple[str, str], "torch.nn.Module | BaseException"] = {}


def float_model(family: str) -> torch.nn.Module:
    """The family's tiny float32 model (built once; callers deep-copy before changing it).
    Gemma's attention scale is set to 1/sqrt(head_dim), as in every released Gemma (the
    tiny configs keep transformers' default ``query_pre_attn_scalar`` 256 for head_dim 16,
    which llama.cpp cannot represent)."""
    if family not in _FLOAT:
        m = build_moe(family) if family in MOE_FAMILIES else build(family)
        cfg = getattr(m.config, "text_config", None) or m.config
        if family.startswith("gemma") and getattr(cfg, "query_pre_attn_scalar", None):
            cfg.query_pre_attn_scalar = cfg.head_dim
            for mod in m.modules():
                if hasattr(mod, "q_proj") and hasattr(mod, "scaling"):
                    mod.scaling = cfg.head_dim ** -0.5
        _FLOAT[family] = m
    return _FLOAT[family]


def tokenizer(family: str):
    """The family's tiny tokenizer, or None."""
    if family not in TOKENIZERS:
        return None
    from tests.export import tiny_tokenizers

    return getattr(tiny_tokenizers, TOKENIZERS[family])()


def quantized(family: str, key: str) -> torch.nn.Module:
    """The family's model quantized with ``RECIPES[key]`` (cached; the exception it raised
    is re-raised on every call)."""
    if (family, key) not in _QUANT:
        preset, kw = RECIPES[key]
        m = copy.deepcopy(float_model(family))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lowbit.quantize(m, preset, forward_loop=loop_over(CALIB), **_group(preset),
                                **kw)
            _QUANT[(family, key)] = m
        except Exception as e:  # noqa: BLE001 - stored, re-raised to each cell
            _QUANT[(family, key)] = e
    got = _QUANT[(family, key)]
    if isinstance(got, BaseException):
        raise got
    return got


def starting_from(family: str, key: str) -> torch.nn.Module:
    """``quantized(family, key)`` for an export cell: n/a when that quantization failed."""
    try:
        return quantized(family, key)
    except Exception as e:  # noqa: BLE001
        raise NotApplicable(f"needs {key}, which did not succeed") from e


@torch.no_grad()
def logits(m: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """float32 logits ``[1, T, vocab]`` of the model for ``ids`` (no KV cache)."""
    return m(ids, use_cache=False).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# --- quantize cells -----------------------------------------------------------------------
def check_quantize(key: str) -> Callable[[str], None]:
    """The recipe runs; outputs finite and moved by quantization; an int4 algorithm's
    output error (relative, against the float model) at most RTN_FACTOR x that of
    round-to-nearest (`int4-weight-only`, same groups), other recipes' below 1; with a
    KV-cache spec, every attention layer carries calibrated K and V quantizers."""

    def run(family: str) -> None:
        m = quantized(family, key)
        ref, out = logits(float_model(family)), logits(m)
        if not torch.isfinite(out).all():
            raise Mismatch("non-finite logits")
        rel = float((out - ref).norm() / ref.norm())
        if rel == 0:
            raise Mismatch("logits unchanged by quantization")
        if key.startswith("int4"):
            rtn = float((logits(quantized(family, "int4-weight-only")) - ref).norm()
                        / ref.norm())
            if rel > RTN_FACTOR * rtn:
                raise Mismatch(f"output error more than {RTN_FACTOR:g}x round-to-nearest's")
        elif rel >= 1:
            raise Mismatch("output error >= the output (relative error >= 1)")
        if RECIPES[key][1].get("kv_cache"):
            n_layers = _n_layers(m)
            kq = [mod for name, mod in m.named_modules() if name.endswith("k_cache_quantizer")]
            vq = [mod for name, mod in m.named_modules() if name.endswith("v_cache_quantizer")]
            if len(kq) != n_layers or len(vq) != n_layers:
                raise Mismatch(f"{len(kq)} K / {len(vq)} V cache quantizers for {n_layers} "
                               "attention layers")
            if any(q.amax is None or not torch.isfinite(q.amax).all() for q in kq + vq):
                raise Mismatch("a KV-cache quantizer is not calibrated")

    return run


def _n_layers(m) -> int:
    cfg = m.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return cfg.num_hidden_layers


# the multimodal class is tested as "the text tower": its vision tower and projector (which,
# at the tiny sizes, outweigh the text weights) are counted apart in the coverage
OTHER_TOWERS = {"gemma3_mm": ("model.vision_tower.", "model.multi_modal_projector.")}


def check_coverage(family: str) -> None:
    """int4-weight-only quantizes >= 99% of the non-embedding weights (lowbit's coverage
    report, ``model.lowbit_report.coverage``; of the text tower for a multimodal class)."""
    m = quantized(family, "int4-weight-only")
    cov = m.lowbit_report.coverage
    skip = OTHER_TOWERS.get(family, ())
    other = sum(p.numel() for n, p in m.named_parameters()
                if p.dim() >= 2 and n.startswith(skip)) if skip else 0
    left = [u for u in cov.unquantized if u.kind not in ("embedding", "lm_head")
            and not u.name.startswith(skip)]
    body = cov.body - other
    share = 1 - sum(u.numel for u in left) / body
    if share < COVERAGE_MIN:
        top = "; ".join(sorted({u.reason for u in sorted(left, key=lambda u: -u.numel)[:2]}))
        raise Mismatch(f"non-embedding weights {share:.1%} quantized (< 99%): {top}")


# --- export cells -------------------------------------------------------------------------
@contextlib.contextmanager
def quiet():
    """Silence torch.export's / onnxscript's prints and log lines (a failure still raises)."""
    names = ("torch", "onnxscript", "onnx_ir")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def _tmp() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lowbit-matrix-")


def check_ct(key: str) -> Callable[[str], None]:
    """``key``'s model -> compressed-tensors -> transformers ``from_pretrained``: no
    missing or unexpected tensor, log-probs equal lowbit's within CT_TOL."""

    def run(family: str) -> None:
        m = starting_from(family, key)
        from transformers import AutoModelForCausalLM
        import transformers

        with _tmp() as d:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = lowbit.save(m, Path(d) / "ct", format="compressed-tensors")
            transformers.logging.set_verbosity_error()
            cls = type(m) if family == "gemma3_mm" else AutoModelForCausalLM
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m2, info = cls.from_pretrained(path, dtype=torch.float32,
                                                   output_loading_info=True)
            except Exception as e:  # noqa: BLE001
                raise Mismatch(f"transformers cannot load it: {type(e).__name__}: "
                               f"{first_line(e)}") from e
            bad = sorted(k for k, v in info.items() if v)
            if bad:
                raise Mismatch(f"transformers reports {', '.join(bad)} tensors")
            lp, lp2 = (torch.log_softmax(logits(x), -1) for x in (m, m2))
            if (lp - lp2).abs().max() > CT_TOL:
                raise Mismatch(f"transformers' log-probs differ from lowbit's beyond "
                               f"{CT_TOL:g}")

    return run


def check_onnx(family: str) -> None:
    """int8-smoothquant -> ONNX QDQ -> onnxruntime: logits within ONNX_TOL of lowbit's."""
    m = starting_from(family, "int8-smoothquant")
    import onnxruntime as ort

    x = ONNX_IDS
    ref = logits(m, x).numpy()
    with _tmp() as d:
        with quiet():
            out = lowbit.save(m, Path(d) / "onnx", format="onnx", example_inputs=(x,),
                              example_kwargs={"use_cache": False})
        sess = ort.InferenceSession(str(out / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise Mismatch(f"onnxruntime output shape {list(got.shape)}, lowbit {list(ref.shape)}")
    if np.abs(got - ref).max() > ONNX_TOL:
        raise Mismatch(f"onnxruntime's logits differ from lowbit's beyond {ONNX_TOL:g}")


# llama.cpp's convert_hf_to_gguf.py permutes q/k rows (rotary layout) for these archs
PERMUTED_QK = {"llama", "granite"}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` of q/k rows (convert_hf_to_gguf.py)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_file(family: str, d: str) -> tuple[torch.nn.Module, Path]:
    m = starting_from(family, "gguf-q4_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = tokenizer(family)
        opts = {"tokenizer": tok} if tok is not None else {}
        return m, lowbit.save(m, Path(d) / "gguf", format="gguf", **opts) / "model.gguf"


def check_gguf(family: str) -> None:
    """gguf-q4_0 -> GGUF -> ``gguf.GGUFReader``: every quantized weight, found by the gguf
    package's own tensor-name map, dequantizes (``gguf.quants.dequantize``) to lowbit's
    fake-quantized weight bit for bit."""
    import gguf
    from transformers.pytorch_utils import Conv1D

    with _tmp() as d:
        m, path = _gguf_file(family, d)
        r = gguf.GGUFReader(path)
        arch_name = r.fields["general.architecture"].contents()
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
        cfg = getattr(m.config, "text_config", None) or m.config
        tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
        tensors = {t.name: t for t in r.tensors}
        n = 0
        for name, mod in m.named_modules():
            if not (isinstance(mod, lowbit.nn.QuantMixin) and mod.weight_quantizer.is_enabled) \
                    or name.startswith(OTHER_TOWERS.get(family, ())):
                continue  # (GGUF holds the text tower of a multimodal model)
            want = mod.quantized_weight().detach().float()
            if isinstance(mod, Conv1D):
                want = want.t()  # GPT-2's Conv1D holds [in, out]; GGUF, as Linear, [out, in]
            hf = name.replace(".language_model.", ".")
            expert = re.search(r"\.experts\.(\d+)\.", hf)
            if expert:
                hf = hf.replace(expert.group(0), ".experts.")
            gname = tmap.get_name(hf + ".weight", try_suffixes=(".weight",))
            if gname is None or gname not in tensors:
                raise Mismatch(f"no GGUF tensor for {name} (gguf's name map: {gname})")
            t = tensors[gname]
            back = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                             dtype=np.float32))
            if expert:
                back = back.reshape(-1, *want.shape)[int(expert.group(1))]
            back = back.reshape(want.shape)
            short = gname.split(".")[-2]
            if arch_name in PERMUTED_QK and short in ("attn_q", "attn_k"):
                heads = cfg.num_attention_heads if short == "attn_q" else \
                    cfg.num_key_value_heads
                want = _permute(want, heads)
            if not torch.equal(back, want):
                raise Mismatch(f"{gname} does not dequantize to lowbit's {name}")
            n += 1
        if n == 0:
            raise Mismatch("no quantized weight in the file")


# config values transformers' GGUF loader (5.24) does not read from the file, which it would
# take from its config class's defaults: the pad token id (a file without a vocabulary names
# none; Phi-3's default 32000 is outside the tiny vocabulary), Gemma's attention scale
# (default 256; llama.cpp uses head_dim), Qwen3's head size (default 128), GPT-2's vocabulary
# size (read from a tokenizer only) and positions (it reads context_length as n_ctx)
NOT_READ = ("pad_token_id", "query_pre_attn_scalar", "head_dim", "vocab_size", "n_positions")


def check_gguf_transformers(family: str) -> None:
    """gguf-q4_0 -> GGUF -> transformers' GGUF loader (``from_pretrained(gguf_file=)``, given
    the config values it does not read from a GGUF, NOT_READ): logits within
    GGUF_HF_TOL (relative) of lowbit's fake-quantized model; with a tokenizer, transformers'
    GGUF tokenizer loader rebuilds one that encodes a sample text the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    import gguf
    import transformers

    with _tmp() as d:
        m, path = _gguf_file(family, d)
        arch = gguf.GGUFReader(path).fields["general.architecture"].contents()
        if arch not in GGUF_CONFIG_MAPPING:
            raise NotApplicable(f"transformers reads no GGUF of architecture {arch}")
        transformers.logging.set_verbosity_error()
        cfg = getattr(m.config, "text_config", None) or m.config
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m2 = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=torch.float32,
                    **{k: getattr(cfg, k) for k in NOT_READ
                       if getattr(cfg, k, None) is not None})
        except Exception as e:  # noqa: BLE001
            raise Mismatch(f"transformers cannot load it: {type(e).__name__}: "
                           f"{first_line(e)}") from e
        if _rel(logits(m2), logits(m)) > GGUF_HF_TOL:
            raise Mismatch(f"transformers' logits differ from lowbit's beyond "
                           f"{GGUF_HF_TOL:g} (relative)")
        tok = tokenizer(family)
        if tok is not None:
            from tests.export.tiny_tokenizers import SAMPLE

            back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            if back.encode(SAMPLE) != tok.encode(SAMPLE):
                raise Mismatch("transformers' tokenizer from the file encodes differently")


def check_native(family: str) -> None:
    """int4-gptq -> ``lowbit.save`` -> ``lowbit.load``: logits equal to the bit."""
    m = starting_from(family, "int4-gptq")
    with _tmp() as d:
        lowbit.save(m, Path(d) / "native")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m2 = lowbit.load(Path(d) / "native")
        if not torch.equal(logits(m2), logits(m)):
            raise Mismatch("reloaded logits differ from the saved model's")


def check_fast(family: str) -> None:
    """int4-gptq, packed (``lowbit.runtime.convert``) -> FastDecoder: prompt logits within
    FAST_TOL (relative) of the model's forward; greedy tokens equal ``generate``'s, up to
    where generate stops at the model's EOS token (a difference only at a near-tie of
    generate's logits, < 1e-3 relative, is accepted)."""
    import lowbit.runtime as rt
    from lowbit.runtime import FastDecoder

    m = copy.deepcopy(starting_from(family, "int4-gptq"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rt.convert(m)
    with torch.inference_mode():
        ref = m(IDS).logits[0]
        dec = FastDecoder(m)
        if _rel(dec.forward(IDS[0], 0, all_logits=True), ref) > FAST_TOL:
            raise Mismatch(f"FastDecoder's logits differ from the model's beyond {FAST_TOL:g}")
        g = m.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0, output_logits=True,
                       return_dict_in_generate=True)
        new = g.sequences[0, IDS.shape[1]:]  # up to generate's own stop at an EOS token
        ours = dec.generate(IDS, NEW_TOKENS)[0, IDS.shape[1]:][:len(new)]
        if len(ours) != len(new):
            raise Mismatch(f"FastDecoder gave {len(ours)} tokens, generate {len(new)}")
        diff = (ours != new).nonzero()
        if len(diff):
            j = int(diff[0])
            top = g.logits[j][0].topk(2).values
            if float(top[0] - top[1]) >= 1e-3 * float(top[0].abs()):
                raise Mismatch(f"greedy token {j + 1} differs from generate's")


# --- the matrix ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Path_:
    """One column: its name in the doc, what it does (one line), and the check."""

    name: str
    what: str
    run: Callable[[str], None]


PATHS = [
    Path_("int4-gptq", "quantize with `int4-gptq` (group 32)", check_quantize("int4-gptq")),
    Path_("int4-awq", "quantize with `int4-awq` (group 32)", check_quantize("int4-awq")),
    Path_("int8-smoothquant", "quantize with `int8-smoothquant`",
          check_quantize("int8-smoothquant")),
    Path_("fp8+kv", "quantize with `fp8` and an FP8 KV cache (`kv_cache=\"fp8\"`)",
          check_quantize("fp8+kv")),
    Path_("coverage", "`int4-weight-only` quantizes >= 99% of the non-embedding weights",
          check_coverage),
    Path_("ct", "`int4-gptq` -> compressed-tensors -> transformers `from_pretrained`: "
          f"log-probs within {CT_TOL:g}", check_ct("int4-gptq")),
    Path_("ct-fp8", "`fp8` (static FP8 weights and activations; no KV cache: transformers "
          "5.24 + compressed-tensors 0.20.1 attach no KV-cache scales, see "
          "tests/export/test_compressed_tensors.py) -> compressed-tensors -> transformers: "
          f"log-probs within {CT_TOL:g}", check_ct("fp8")),
    Path_("onnx", "`int8-smoothquant` -> ONNX QDQ -> onnxruntime: logits within "
          f"{ONNX_TOL:g}", check_onnx),
    Path_("gguf", "`gguf-q4_0` -> GGUF -> `gguf.GGUFReader`: every quantized weight "
          "dequantizes to lowbit's, bit for bit", check_gguf),
    Path_("gguf-hf", "`gguf-q4_0` -> GGUF -> transformers' GGUF loader: logits within "
          f"{GGUF_HF_TOL:g} (relative); given the config values it does not read from a GGUF "
          "(pad token id, vocabulary size, Gemma's `query_pre_attn_scalar`, `head_dim`, "
          "GPT-2's `n_positions`)",
          check_gguf_transformers),
    Path_("native", "`int4-gptq` -> `lowbit.save` -> `lowbit.load`: logits equal",
          check_native),
    Path_("fast", "`int4-gptq`, packed -> `FastDecoder`: logits within "
          f"{FAST_TOL:g} (relative), greedy tokens equal `generate`'s", check_fast),
]
PATH_NAMES = [p.name for p in PATHS]
CELLS = [(f, p) for f in FAMILIES for p in PATH_NAMES]


# cells where the engine, not lowbit, cannot do it (checked: the cell still runs, and its
# outcome becomes ``yes`` the day the engine can): the reason replaces the engine's failure
# (a Mismatch: an error inside lowbit stays a FAIL)
ENGINE_GAPS = {
    ("gpt_oss", "ct"): "transformers has no conversion for gpt-oss, so it cannot reload "
                       "per-expert compressed-tensors weights (docs/deploy.md)",
    ("gpt_oss", "ct-fp8"): "transformers has no conversion for gpt-oss, so it cannot reload "
                           "per-expert compressed-tensors weights (docs/deploy.md)",
    ("mixtral", "gguf-hf"): "transformers' GGUF loader reads the llama architecture as a "
                            "dense Llama (no experts)",
    **{(f, "ct-fp8"): "transformers fuses the experts on load and attaches no activation "
                      "quantization to them: their static input scales are unexpected keys "
                      "(docs/deploy.md)" for f in MOE_FAMILIES if f != "gpt_oss"},
}


def first_line(e: BaseException) -> str:
    """The exception's first line, made deterministic (no temp paths, no addresses)."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    s = (s.splitlines() or [""])[0]
    s = re.sub(r"(/[^\s'\"]*)?lowbit-matrix-[^\s'\"/]*(/[^\s'\"]*)?", "<dir>", s)
    s = re.sub(r"0x[0-9a-fA-F]+", "0x?", s)
    return s.strip() or type(e).__name__


def run_cell(family: str, path: str) -> str:
    """Run one cell; returns its outcome string (see the module doc)."""
    run = next(p.run for p in PATHS if p.name == path)
    torch.manual_seed(0)
    try:
        run(family)
        return "yes"
    except ConfigError as e:
        return f"refused: {first_line(e)}"
    except NotApplicable as e:
        return f"n/a: {first_line(e)}"
    except Exception as e:  # noqa: BLE001 - every other exception is a bug to report
        if (family, path) in ENGINE_GAPS and isinstance(e, Mismatch):
            return f"n/a: {ENGINE_GAPS[(family, path)]}"
        if isinstance(e, Mismatch):
            return f"FAIL: {first_line(e)}"
        line = f"FAIL: {type(e).__name__}: {first_line(e)}"
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        if root is not e:
            line += f" (cause: {type(root).__name__}: {first_line(root)})"
        return line


NOTES = {
    "llama": "Llama 2/3.x (one model type)",
    "llama2_sp": "Llama with a tiny Llama-2-shaped SentencePiece tokenizer "
                 "(`tests/export/tiny_tokenizers.py`, vocabulary 416) written into the GGUF",
    "gemma2": "attention scale 1/sqrt(head_dim) as released",
    "gemma3": "the text-only class, attention scale 1/sqrt(head_dim) as released",
    "gemma3_mm": "the multimodal class: its text tower (a tiny SigLIP vision tower and the "
                 "projector beside it; calibration is text only, so static quantizers there "
                 "see no data; coverage counts the text tower)",
    "phi3": "Phi-3 and Phi-4 (one model type)",
}


def describe(family: str) -> str:
    """One line for the doc: the transformers class (and model type) of the family's row."""
    try:
        m = float_model(family)
    except Exception as e:  # noqa: BLE001
        return f"not built: {type(e).__name__}: {first_line(e)}"
    kind = "MoE, 4 experts, top-2; " if family in MOE_FAMILIES else ""
    note = NOTES.get(family, "")
    return (f"`{type(m).__name__}` ({kind}model_type `{m.config.model_type}`)"
            + (f", {note}" if note else "") + ".")
