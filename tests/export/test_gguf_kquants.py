"""GGUF export of the ggml block types (issue 19): gguf_* weights packed as they are, the token
embedding / output head quantized at export, int checkpoints to the nearest ggml type.

Every tensor is read back with the ``gguf`` package's own dequantizer and compared with
lowbit's values; transformers' GGUF loader (which dequantizes through the same package)
gives logits equal to lowbit's fake-quantized model.
"""

import types
import warnings

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import ConfigError
from lowbit.export.base import quantized_modules, weight_qtensor
from lowbit.export.gguf import qk_rows
from lowbit.export.gguf_types import _full

gguf = pytest.importorskip("gguf")

SHORT = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
KTYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "iq4_nl", "q4_0", "q4_1",
          "q5_0", "q5_1", "q8_0", "nvfp4"]


def _llama(hidden=256, inter=512, vocab=256, tied=False):
    """A tiny Llama whose widths fit 256-blocks (two layers, four heads, two KV heads)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=tied)
    m = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    return m.eval()


def _recipe(weight, exclude=("lm_head",)):
    return {"name": "t", "targets": [{"pattern": "*", "weight": weight}],
            "exclude": list(exclude)}


def _save(m, path, **kw):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = lowbit.save(m, path, format="gguf", **kw)
    return gguf.GGUFReader(out / "model.gguf"), [str(w.message) for w in got], out


def _deq(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                     dtype=np.float32))


def _undo_qk(back, name, cfg):
    short = name.rsplit(".", 1)[1]
    if short not in ("q_proj", "k_proj"):
        return back
    heads = cfg.num_attention_heads if short == "q_proj" else cfg.num_key_value_heads
    rows = qk_rows(back.shape[0], heads)
    undo = torch.empty_like(rows)
    undo[rows] = torch.arange(rows.numel())
    return back[undo]


def _file_weights(model, reader):
    """{module name: (file weight in lowbit's row order, ggml type)} of the quantized ones."""
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, m in quantized_modules(model):
        if ".experts." in name:
            continue  # stacked: checked by the MoE test
        layer = int(name.split("layers.")[1].split(".")[0])
        t = tensors[f"blk.{layer}.{SHORT[name.rsplit('.', 1)[1]]}.weight"]
        back = _deq(t).reshape(m.weight.shape)
        out[name] = (_undo_qk(back, name, model.config), t.tensor_type.name)
    return out


def _transformers_logits(out, ids):
    import transformers as tf

    ref = tf.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf",
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


Q4G32 = {"format": "int4", "granularity": "group", "group_size": 32, "scale_format": "fp16"}
IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


# --- 1. gguf_* weights, packed as they are ------------------------------------------------
@pytest.mark.parametrize("kind", KTYPES)
def test_gguf_spec_weights_read_back_bit_for_bit(tmp_path, kind):
    m = _llama()
    lowbit.quantize(m, _recipe({"format": f"gguf_{kind}"}))
    r, _, out = _save(m, tmp_path / "g")
    got = _file_weights(m, r)
    assert len(got) == 14
    for name, (back, t) in got.items():
        mod = dict(m.named_modules())[name]
        assert t == kind.upper(), name
        assert torch.equal(back, mod.quantized_weight().detach().float()), name
    ft = {t.name: t.tensor_type.name for t in r.tensors}
    assert ft["token_embd.weight"] == "F32" and ft["output.weight"] == "F32"


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "iq4_xs", "q3_k"])
def test_transformers_loader_gives_lowbit_logits(tmp_path, kind):
    m = _llama()
    lowbit.quantize(m, _recipe({"format": f"gguf_{kind}"}))
    _, _, out = _save(m, tmp_path / "g")
    with torch.no_grad():
        want = m(IDS).logits
    assert float((_transformers_logits(out, IDS) - want).abs().max()) < 1e-5


def test_gguf_spec_with_32_blocks_on_the_hidden_64_model(tmp_path):
    from tests.tiny_models import build

    m = build("llama")
    lowbit.quantize(m, _recipe({"format": "gguf_iq4_nl"}))
    r, _, _ = _save(m, tmp_path / "g")
    for name, (back, t) in _file_weights(m, r).items():
        mod = dict(m.named_modules())[name]
        assert t == "IQ4_NL" and torch.equal(back, mod.quantized_weight().detach().float())


# --- 2. token embedding / output types ----------------------------------------------------
@pytest.mark.parametrize("emb", ["q6_k", "Q4_K", "iq4_xs", "q8_0", "q4_0"])
def test_embedding_type_quantizes_with_lowbit_core(tmp_path, emb):
    from lowbit.core.ggml import quantize_fields
    from lowbit.formats import ggml_blocks

    m = _llama()
    lowbit.quantize(m, _recipe(Q4G32, exclude=["lm_head"]))
    r, warns, _ = _save(m, tmp_path / "g", embedding_type=emb, output_type="q8_0")
    t = {t.name: t for t in r.tensors}
    e = m.model.embed_tokens.weight.detach().float()
    assert t["token_embd.weight"].tensor_type.name == emb.upper()
    want = ggml_blocks.dequantize(emb.upper(), quantize_fields(e, emb.upper()))
    assert torch.equal(_deq(t["token_embd.weight"]).reshape(e.shape), want)
    assert 0 < float((want - e).abs().max()) < 0.05
    assert t["output.weight"].tensor_type.name == "Q8_0"
    assert any("token_embd.weight to " + emb.upper() in w and "in-memory model" in w
               for w in warns)


def test_tied_embedding_takes_the_output_type(tmp_path):
    m = _llama(tied=True)
    lowbit.quantize(m, _recipe(Q4G32, exclude=["lm_head"]))
    r, _, _ = _save(m, tmp_path / "g", output_type="q6_k")
    ft = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in ft and ft["token_embd.weight"] == "Q6_K"
    r2, _, _ = _save(m, tmp_path / "g2", output_type="q6_k", embedding_type="f16")
    assert {t.name: t.tensor_type.name for t in r2.tensors}["token_embd.weight"] == "F16"


def test_embedding_default_from_the_mix_plan(tmp_path):
    m = _llama()
    lowbit.quantize(m, _recipe(Q4G32, exclude=["lm_head"]))
    m.lowbit_report = types.SimpleNamespace(
        gguf_mix={"ftype": "q4_k_m", "token_embd": "Q4_K", "output": "Q6_K"})
    r, _, _ = _save(m, tmp_path / "g")
    ft = {t.name: t.tensor_type.name for t in r.tensors}
    assert ft["token_embd.weight"] == "Q4_K" and ft["output.weight"] == "Q6_K"
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    r2, _, _ = _save(m, tmp_path / "g2", embedding_type="f32")  # the option wins
    assert {t.name: t.tensor_type.name for t in r2.tensors}["token_embd.weight"] == "F32"


def test_bad_type_options(tmp_path):
    from tests.tiny_models import build

    m = _llama()
    lowbit.quantize(m, _recipe(Q4G32, exclude=()))
    for opt in ("embedding_type", "output_type", "requantize_type"):
        with pytest.raises(ConfigError, match=f"{opt} 'q7_k'; expected one of: .*q6_k"):
            lowbit.save(m, tmp_path / "g", format="gguf", **{opt: "q7_k"})
    small = build("llama")  # hidden 64: no 256-block type fits its embedding rows
    lowbit.quantize(small, _recipe(Q4G32))
    with pytest.raises(ConfigError, match="token_embd.weight has 64 columns.*Q4_K"):
        lowbit.save(small, tmp_path / "g", format="gguf", embedding_type="q4_k")
    assert not (tmp_path / "g").exists()
    with pytest.raises(ConfigError, match="output_type 'q6_k' applies to a float output head, "
                                          "but lm_head is quantized"):
        lowbit.save(m, tmp_path / "g", format="gguf", output_type="q6_k")


# --- 3. int checkpoints to the nearest ggml type -----------------------------------------
INT4_G128 = {"format": "int4", "granularity": "group", "group_size": 128}  # fp32 scales


def test_int4_g128_fp32_scales_exports_as_a_4_bit_file(tmp_path):
    m = _llama()
    lowbit.quantize(m, _recipe(INT4_G128))
    with pytest.raises(ConfigError, match="allow_requantize"):
        lowbit.save(m, tmp_path / "g0", format="gguf")
    r, warns, out = _save(m, tmp_path / "g", allow_requantize=True)
    got = _file_weights(m, r)
    assert {t for _, t in got.values()} == {"Q4_0"}
    for name, (back, _) in got.items():
        want = dict(m.named_modules())[name].quantized_weight().detach().float()
        assert float((back - want).abs().max()) < 2e-3 * float(want.abs().max()), name
    w = next(x for x in warns if "requantized 14 layers" in x)
    assert "14 x Q4_0" in w and "model.layers.1.mlp.down_proj: Q4_0, max change" in w
    # the size of a 4-bit file, not an 8-bit one: 4.5 bits per quantized weight
    n_q = sum(mod.weight.numel() for _, mod in quantized_modules(m))
    q_bytes = sum(int(t.n_bytes) for t in r.tensors if t.tensor_type.name == "Q4_0")
    assert q_bytes == n_q * 18 // 32
    with torch.no_grad():
        want = m(IDS).logits
    assert float((_transformers_logits(out, IDS) - want).abs().max()) < 0.01  # logits ~2


@pytest.mark.parametrize("spec,kind", [
    ({**INT4_G128, "symmetric": False}, {"Q4_K", "Q4_1"}),
    ({"format": "int8", "granularity": "channel"}, {"Q8_0"}),
    ({"format": "int3", "granularity": "group", "group_size": 64, "scale_format": "bf16"},
     {"Q3_K", "Q4_0"}),
])
def test_nearest_types_keep_the_codes(tmp_path, spec, kind):
    m = _llama()
    lowbit.quantize(m, _recipe(spec))
    r, warns, _ = _save(m, tmp_path / "g", allow_requantize=True)
    for name, (back, t) in _file_weights(m, r).items():
        mod = dict(m.named_modules())[name]
        assert t in kind, (name, t)
        # within half a step of lowbit's own grid: its scales give back the same codes
        step = _full(weight_qtensor(mod), weight_qtensor(mod).scale).abs()
        want = mod.quantized_weight().detach().float()
        assert bool(((back - want).abs() < step / 2).all()), name
    assert not any("do not keep every code" in w for w in warns)


def test_explicit_requantize_type(tmp_path):
    m = _llama()
    lowbit.quantize(m, _recipe(INT4_G128))
    r, warns, _ = _save(m, tmp_path / "g", allow_requantize=True, requantize_type="q5_k")
    assert {t for _, t in _file_weights(m, r).values()} == {"Q5_K"}
    assert any("requantized 14 layers to Q5_K" in w for w in warns)


# --- MoE: experts stacked in one tensor ---------------------------------------------------
@pytest.mark.parametrize("spec,kind,exact", [
    ({"format": "gguf_iq4_nl"}, "IQ4_NL", True),
    ({"format": "int4", "granularity": "group", "group_size": 32}, "Q4_0", False),  # fp32
])
def test_moe_experts_stacked(tmp_path, spec, kind, exact):
    from tests.export.test_moe_export import _build_wide
    from tests.tiny_models import calib_ids, loop_over

    m = _build_wide("mixtral")
    lowbit.quantize(m, _recipe(spec), forward_loop=loop_over(calib_ids(4, 16)))
    r, warns, _ = _save(m, tmp_path / "g", allow_requantize=True)
    tensors = {t.name: t for t in r.tensors}
    for layer in (0, 1):
        experts = m.model.layers[layer].mlp.experts
        for short, role in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            t = tensors[f"blk.{layer}.ffn_{short}_exps.weight"]
            want = torch.stack([getattr(e, role).quantized_weight().detach() for e in experts])
            back = _deq(t).reshape(want.shape)
            assert t.tensor_type.name == kind, t.name
            if exact:
                assert torch.equal(back, want), t.name
            else:
                assert float((back - want).abs().max()) < 2e-3 * float(want.abs().max())
    # q/k rows of a gguf_* weight are permuted with every field: read back == lowbit's
    for name, (back, t) in _file_weights(m, r).items():
        if name.endswith(("q_proj", "k_proj")):
            want = dict(m.named_modules())[name].quantized_weight().detach().float()
            assert t == kind
            assert torch.equal(back, want) if exact else \
                float((back - want).abs().max()) < 2e-3 * float(want.abs().max())
    assert exact or any("model.layers.0.mlp.experts.*.down_proj: Q4_0" in w for w in warns)


# --- the native checkpoint of gguf_* weights ----------------------------------------------
@pytest.mark.parametrize("kind", ["q4_k", "q3_k", "iq4_xs", "q4_1", "nvfp4"])
def test_native_checkpoint_holds_ggml_bytes(tmp_path, kind):
    from safetensors.torch import load_file

    m = _llama()
    lowbit.quantize(m, _recipe({"format": f"gguf_{kind}"}))
    out = lowbit.save(m, tmp_path / "n", format="lowbit")
    sd = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert f"{key}.scale" not in sd and f"{key}.global_scale" not in sd
    r, _, _ = _save(m, tmp_path / "g")
    t = {t.name: t for t in r.tensors}["blk.0.ffn_down.weight"]
    assert np.array_equal(sd[f"{key}.codes"].numpy(), np.asarray(t.data))  # same bytes
    back = lowbit.load(out)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, m(IDS).logits)
    for name, mod in quantized_modules(m):
        got = dict(back.named_modules())[name].quantized_weight()
        assert torch.equal(got, mod.quantized_weight()), name


# --- llama-quantize agrees on the types ----------------------------------------------------
LLAMA_BIN = "/work/cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"


@pytest.mark.external
@pytest.mark.skipif(not __import__("os").path.exists(LLAMA_BIN + "/llama-quantize"),
                    reason=f"needs llama.cpp's llama-quantize in {LLAMA_BIN}")
def test_mix_file_has_llama_quantize_types_and_size(tmp_path):
    """lowbit's gguf-q4_k_m file (mix types, token_embd/output from the mix plan) holds the
    same tensor types as llama-quantize Q4_K_M of the F32 file, and the same size."""
    import subprocess

    f32 = _save(_llama(), tmp_path / "f32")[2] / "model.gguf"
    subprocess.run([LLAMA_BIN + "/llama-quantize", str(f32), str(tmp_path / "q.gguf"),
                    "Q4_K_M", "1"], check=True, capture_output=True, timeout=120)
    m = _llama()
    lowbit.quantize(m, "gguf-q4_k_m")
    r, warns, out = _save(m, tmp_path / "g")
    ref = gguf.GGUFReader(tmp_path / "q.gguf")
    assert {t.name: t.tensor_type.name for t in r.tensors} == \
        {t.name: t.tensor_type.name for t in ref.tensors}
    assert sum(int(t.n_bytes) for t in r.tensors) == sum(int(t.n_bytes) for t in ref.tensors)
    assert r.fields["general.file_type"].contents() == \
        ref.fields["general.file_type"].contents()
    assert any("token_embd.weight to Q4_K, output.weight to Q6_K" in w for w in warns)


def test_moe_experts_of_different_ggml_types(tmp_path):
    """One stacked tensor has one type: experts quantized as IQ4_NL and Q8_0 are refused,
    or requantized together to the nearest type that holds both."""
    from tests.export.test_moe_export import _build_wide
    from tests.tiny_models import calib_ids, loop_over

    m = _build_wide("mixtral")
    lowbit.quantize(m, {"name": "t", "exclude": ["lm_head"], "targets": [
        {"pattern": "*", "weight": {"format": "gguf_iq4_nl"}},
        {"pattern": "*experts.0.*", "weight": {"format": "gguf_q8_0"}}]},
        forward_loop=loop_over(calib_ids(4, 16)))
    with pytest.raises(ConfigError, match=r"experts\.\*\.gate_proj .*different ggml types "
                                          r"\(\['IQ4_NL', 'Q8_0'\]\)"):
        lowbit.save(m, tmp_path / "g0", format="gguf")
    r, warns, _ = _save(m, tmp_path / "g", allow_requantize=True)
    t = {t.name: t for t in r.tensors}["blk.0.ffn_down_exps.weight"]
    experts = m.model.layers[0].mlp.experts
    want = torch.stack([e.down_proj.quantized_weight().detach() for e in experts])
    assert t.tensor_type.name == "Q8_0"
    assert float((_deq(t).reshape(want.shape) - want).abs().max()) < 0.01 * float(want.abs().max())
    assert any("6 x Q8_0" in w and "do not keep" not in w for w in warns)
