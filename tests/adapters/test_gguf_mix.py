"""llama-quantize's mixes (lowbit.adapters.gguf_mix) against tables derived by hand from
llama.cpp's src/llama-quant.cpp, and (``external``) against llama-quantize --dry-run itself."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.adapters import gguf_mix as gm
from lowbit.adapters.gguf_names import gguf_tensor_names
from lowbit.errors import ConfigError
from tests.tiny_models import build

LLAMA_BIN = Path("/work/cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
needs_quantize = pytest.mark.skipif(not (LLAMA_BIN / "llama-quantize").exists(),
                                    reason=f"needs llama.cpp's llama-quantize in {LLAMA_BIN}")


def _llama(hidden=256, inter=512, layers=8, heads=8, kv=2, tied=False, meta=True, seed=0):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=128,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return tf.LlamaForCausalLM(cfg)
    return tf.LlamaForCausalLM(cfg).eval()


def _by_tensor(p: gm.MixPlan, model) -> dict[str, str]:
    names = gguf_tensor_names(model)
    out = {names[k].name: t for k, (_, t, _) in p.modules.items()}
    out["token_embd.weight"] = p.token_embd
    if p.output is not None:
        out["output.weight"] = p.output
    return out


def _expect(layers, base, v=None, down=None, o=None, emb=None, out="Q6_K", k=None):
    """{tensor: type}: ``base`` everywhere, the dicts ``{layer: type}`` for attn_v/ffn_down/
    attn_output/attn_k."""
    e = {"token_embd.weight": emb or base, "output.weight": out}
    for i in range(layers):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                  "ffn_down"):
            e[f"blk.{i}.{t}.weight"] = base
        for t, d in (("attn_v", v), ("ffn_down", down), ("attn_output", o), ("attn_k", k)):
            if d:
                for j, ty in d.items():
                    e[f"blk.{i}.{t}.weight" if j == i else f"blk.{j}.{t}.weight"] = ty
    return e


MORE = (0, 3, 6, 7)  # use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2


def test_use_more_bits():
    assert [i for i in range(8) if gm.use_more_bits(i, 8)] == list(MORE)
    assert [i for i in range(30) if gm.use_more_bits(i, 30)] == \
        [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


# hidden 256, intermediate 512, 8 layers, 8 heads / 2 KV heads (n_gqa 4), untied: every
# K block fits, so these are llama_tensor_get_type_impl's rules alone.
TABLES = {
    # attn_v and ffn_down: Q6_K where use_more_bits; output Q6_K; untied token_embd: default
    "q4_k_m": dict(base="Q4_K", v={i: "Q6_K" for i in MORE}, down={i: "Q6_K" for i in MORE}),
    "q5_k_m": dict(base="Q5_K", v={i: "Q6_K" for i in MORE}, down={i: "Q6_K" for i in MORE}),
    # Q4_K_S: attn_v Q5_K for i_attention_wv < 4; ffn_down Q5_K in the first eighth
    "q4_k_s": dict(base="Q4_K", v={i: "Q5_K" for i in range(4)}, down={0: "Q5_K"}),
    # Q3_K_M: attn_v Q5_K for the first 2, else Q4_K; ffn_down Q4_K (non-falcon; n/16 = 0);
    # attn_output Q4_K
    "q3_k_m": dict(base="Q3_K", v={i: "Q5_K" if i < 2 else "Q4_K" for i in range(8)},
                   down={i: "Q4_K" for i in range(8)}, o={i: "Q4_K" for i in range(8)}),
    "q3_k_l": dict(base="Q3_K", v={i: "Q5_K" for i in range(8)},
                   down={i: "Q5_K" for i in range(8)}, o={i: "Q5_K" for i in range(8)}),
    "q3_k_s": dict(base="Q3_K"),
    # Q2_K: attn_v Q4_K (n_gqa >= 4), ffn_down Q3_K, attn_output Q3_K
    "q2_k": dict(base="Q2_K", v={i: "Q4_K" for i in range(8)},
                 down={i: "Q3_K" for i in range(8)}, o={i: "Q3_K" for i in range(8)}),
    "q6_k": dict(base="Q6_K"),
    # IQ4: attn_v Q5_K (n_gqa >= 4); ffn_down Q5_K in the first eighth without imatrix
    "iq4_xs": dict(base="IQ4_XS", v={i: "Q5_K" for i in range(8)}, down={0: "Q5_K"}),
    "iq4_nl": dict(base="IQ4_NL", v={i: "Q5_K" for i in range(8)}, down={0: "Q5_K"}),
    "q4_0": dict(base="Q4_0"),
    "q8_0": dict(base="Q8_0", out="Q8_0"),  # output stays Q8_0 when the default is Q8_0
}


@pytest.mark.parametrize("ftype", list(TABLES))
def test_plan_256_wide(ftype):
    m = _llama()
    assert _by_tensor(gm.plan(m, ftype), m) == _expect(8, **TABLES[ftype])


def test_plan_imatrix_rules():
    m = _llama()
    # with an imatrix, IQ4's first-eighth ffn_down rule is off ...
    assert _by_tensor(gm.plan(m, "iq4_xs", has_imatrix=True), m) == \
        _expect(8, "IQ4_XS", v={i: "Q5_K" for i in range(8)})
    # ... and Q4_0 guards the first eighth of ffn_down with Q4_1
    assert _by_tensor(gm.plan(m, "q4_0", has_imatrix=True), m) == \
        _expect(8, "Q4_0", down={0: "Q4_1"})
    with pytest.raises(ConfigError, match="q2_k_s needs an importance matrix"):
        gm.plan(m, "q2_k_s")


@pytest.mark.parametrize("steps,has", [([], False), (["imatrix"], True), (["gptq"], True),
                                       (["awq", "imatrix"], True), (["awq"], False)])
def test_expand_importance_from_the_steps(steps, has):
    """Steps that search scales with calibration importance plan the mix with llama.cpp's
    imatrix rules: IQ4_XS keeps IQ4_XS on the first eighth of ffn_down only then."""
    from lowbit.config import Recipe

    m = _llama()
    r = Recipe.parse({"gguf_mix": "iq4_xs", "algorithms": [{"name": s} for s in steps]})
    _, p = gm.expand(m, r)
    want = _by_tensor(gm.plan(m, "iq4_xs", has_imatrix=has), m)
    assert _by_tensor(p, m) == want
    assert (want["blk.0.ffn_down.weight"] == "IQ4_XS") == has


def test_plan_gqa_below_4():
    m = _llama(heads=4, kv=2)  # n_gqa 2: no n_gqa >= 4 rules
    assert _by_tensor(gm.plan(m, "q2_k"), m) == _expect(
        8, "Q2_K", v={i: "Q3_K" for i in range(8)}, down={i: "Q3_K" for i in range(8)},
        o={i: "Q3_K" for i in range(8)})
    assert _by_tensor(gm.plan(m, "iq4_nl"), m) == _expect(8, "IQ4_NL", down={0: "Q5_K"})


def test_plan_tiny_llama_every_k_type_falls_back():
    # hidden 64, intermediate 128, 2 layers, untied: tensor_type_fallback everywhere
    m = build("llama")
    p = gm.plan(m, "q4_k_m")
    # use_more_bits(1, 2) (i >= 7*2/8 = 1): layer 1's attn_v/ffn_down Q6_K -> Q8_0;
    # the rest Q4_K -> Q5_0; output: the default's block does not fit -> Q8_0
    assert _by_tensor(p, m) == _expect(2, "Q5_0", v={1: "Q8_0"}, down={1: "Q8_0"},
                                       out="Q8_0")
    assert len(p.fallbacks) == 14 and "64 columns not a multiple of 256 (Q4_K) -> Q5_0" in \
        p.fallbacks["model.layers.0.self_attn.q_proj"]
    assert _by_tensor(gm.plan(m, "iq4_xs"), m)["blk.0.attn_q.weight"] == "IQ4_NL"
    assert _by_tensor(gm.plan(m, "q2_k"), m)["blk.0.attn_q.weight"] == "Q4_0"
    assert _by_tensor(gm.plan(m, "q5_k_m"), m)["blk.0.attn_q.weight"] == "Q5_1"


def test_smollm2_widths():
    # SmolLM2-135M: 576 wide (q/k/v/o/gate/up fall back), ffn_down 1536 (fits), 30 layers,
    # 9 heads / 3 KV heads, tied embeddings
    kw = dict(n_layers=30, n_gqa=3, tied=True)
    assert gm.tensor_type("blk.0.attn_q.weight", 576, "q4_k_m", **kw) == "Q5_0"
    assert gm.tensor_type("blk.0.attn_v.weight", 576, "q4_k_m", **kw) == "Q8_0"
    assert gm.tensor_type("blk.3.attn_v.weight", 576, "q4_k_m", **kw) == "Q5_0"
    assert gm.tensor_type("blk.0.ffn_down.weight", 1536, "q4_k_m", **kw) == "Q6_K"
    assert gm.tensor_type("blk.3.ffn_down.weight", 1536, "q4_k_m", **kw) == "Q4_K"
    assert gm.tensor_type("token_embd.weight", 576, "q4_k_m", **kw) == "Q8_0"
    assert gm.tensor_type("blk.9.attn_q.weight", 576, "q6_k", **kw) == "Q8_0"
    assert gm.tensor_type("blk.9.attn_q.weight", 576, "iq4_xs", **kw) == "IQ4_NL"
    assert gm.tensor_type("blk.9.attn_q.weight", 100, "q4_k_m", **kw) == "F16"


def test_plan_smollm2_135m_shape():
    # SmolLM2-135M's config (meta tensors): 30 layers, 576 wide, ffn 1536, 9/3 heads, tied
    m = _llama(hidden=576, inter=1536, layers=30, heads=9, kv=3, tied=True)
    p = gm.plan(m, "q4_k_m")
    more = [i for i in range(30) if gm.use_more_bits(i, 30)]
    want = {}
    for i in range(30):
        for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            want[f"blk.{i}.{t}.weight"] = "Q5_0"  # Q4_K, 576 % 256 != 0 -> Q5_0
        want[f"blk.{i}.attn_v.weight"] = "Q8_0" if i in more else "Q5_0"  # Q6_K -> Q8_0
        want[f"blk.{i}.ffn_down.weight"] = "Q6_K" if i in more else "Q4_K"  # 1536 fits
    want["token_embd.weight"] = "Q8_0"  # tied: the output rule, 576 % 256 != 0 -> Q8_0
    assert _by_tensor(p, m) == want and p.output is None
    assert len(p.fallbacks) == 30 * 6


def test_options():
    m = _llama()
    p = gm.plan(m, "q4_k_m", output_type="q8_0", embedding_type="Q5_K")
    assert (p.output, p.token_embd) == ("Q8_0", "Q5_K")
    p = gm.plan(m, "q4_k_m", pure=True)
    assert set(p.types().values()) == {"Q4_K"} and p.output == "Q4_K"
    assert gm.plan(m, "Q4_K").ftype == "q4_k_m"  # llama-quantize's alias
    with pytest.raises(ConfigError, match="GGUF mix 'iq2_xs' is not supported"):
        gm.plan(m, "iq2_xs")
    with pytest.raises(ConfigError, match="output_type Q6_K: output.weight has rows of 64 "
                                          "values, not a multiple of Q6_K's block of 256"):
        gm.plan(build("llama"), "q4_k_m", output_type="q6_k")
    with pytest.raises(ConfigError, match="output_type 'q9_k'"):
        gm.plan(m, "q4_k_m", output_type="q9_k")


def test_tied_output_type_reaches_embedding():
    m = _llama(tied=True)
    p = gm.plan(m, "q4_k_m")
    assert (p.token_embd, p.output) == ("Q6_K", None)
    assert gm.plan(m, "q4_k_m", output_type="q8_0").token_embd == "Q8_0"


# --- against llama-quantize itself -------------------------------------------------------

_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s+(\w+), size =.*?"
                   r"(?:\((\w+)\))?\s*$")


def _dry_run(path: Path, ftype: str, *opts: str) -> dict[str, str]:
    env = {"LD_LIBRARY_PATH": str(LLAMA_BIN), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(LLAMA_BIN / "llama-quantize"), "--dry-run", *opts, str(path),
                        ftype.upper()], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = {}
    for line in (r.stdout + r.stderr).splitlines():
        mo = _LINE.match(line)
        if mo and mo.group(3):
            out[mo.group(1)] = mo.group(3).upper()
    return out


def _model(kind):
    if kind == "tiny_llama":
        return build("llama")
    if kind == "llama_256":
        return _llama(meta=False)
    if kind == "llama_256_tied_gqa2":
        return _llama(heads=4, kv=2, tied=True, layers=9, meta=False)
    if kind == "smollm2_like":
        return _llama(hidden=576, inter=1536, layers=3, heads=9, kv=3, tied=True, meta=False)
    if kind == "phi3":
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.Phi3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                            pad_token_id=0)
        return tf.Phi3ForCausalLM(cfg).eval()
    if kind in ("mixtral", "qwen2_moe"):
        from tests.moe_models import build_moe
        from lowbit.adapters.experts import unfuse_experts

        m = build_moe(kind)
        unfuse_experts(m)
        return m
    if kind == "mixtral_8x_256":  # 8 experts: llama.cpp's n_expert == 8 rules
        import transformers as tf
        from lowbit.adapters.experts import unfuse_experts

        torch.manual_seed(0)
        cfg = tf.MixtralConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2,
                               num_local_experts=8, num_experts_per_tok=2, vocab_size=128)
        m = tf.MixtralForCausalLM(cfg).eval()
        unfuse_experts(m)
        return m
    return build(kind)


KINDS = ["tiny_llama", "llama_256", "llama_256_tied_gqa2", "smollm2_like", "phi3", "qwen2",
         "gpt2", "mixtral", "qwen2_moe", "mixtral_8x_256"]


@pytest.mark.external
@needs_quantize
@pytest.mark.parametrize("kind", KINDS)
def test_against_llama_quantize(kind, tmp_path):
    import lowbit

    m = _model(kind)
    lowbit.save(m, tmp_path / "f32", format="gguf")
    gguf_file = tmp_path / "f32" / "model.gguf"
    cases = [(f, {}) for f in gm.FTYPES if f != "q2_k_s"]
    cases += [("q4_k_m", {"output_type": "q8_0", "embedding_type": "q5_1"}),
              ("q3_k_m", {"pure": True})]
    for ftype, opt in cases:
        args = []
        if "output_type" in opt:
            args += ["--output-tensor-type", opt["output_type"]]
        if "embedding_type" in opt:
            args += ["--token-embedding-type", opt["embedding_type"]]
        if opt.get("pure"):
            args += ["--pure"]
        ref = _dry_run(gguf_file, ftype, *args)
        got = _by_tensor(gm.plan(m, ftype, **opt), m)
        ref = {k: v for k, v in ref.items() if k in got or k == "output.weight"}
        assert got == ref, (kind, ftype, opt,
                            {k: (got.get(k), ref.get(k)) for k in set(got) | set(ref)
                             if got.get(k) != ref.get(k)})
    # with an importance matrix (the IQ4 and Q4_0/Q5_0 ffn_down rules; Q2_K_S needs one)
    from lowbit.calib.imatrix_file import write_imatrix

    names = gguf_tensor_names(m)
    data = {}
    for t in names.values():
        n_mat = 1
        if t.expert:
            n_mat = sum(1 for x in names.values() if x.name == t.name) // 1
        data[t.name] = (np.ones((n_mat, t.n_cols), np.float32), np.ones(n_mat, np.float32))
    im = tmp_path / "imatrix.gguf"
    write_imatrix(im, data, dataset="ones", chunks=1, chunk_size=1)
    for ftype in ("iq4_xs", "iq4_nl", "q4_0", "q5_0", "q2_k_s", "q4_k_m"):
        ref = _dry_run(gguf_file, ftype, "--imatrix", str(im))
        got = _by_tensor(gm.plan(m, ftype, has_imatrix=True), m)
        ref = {k: v for k, v in ref.items() if k in got or k == "output.weight"}
        assert got == ref, (kind, ftype, opt,
                            {k: (got.get(k), ref.get(k)) for k in set(got) | set(ref)
                             if got.get(k) != ref.get(k)})
