"""GGUF export of Gemma-2, Gemma-3 (text class and the multimodal class's text tower) and
Phi-3, and SentencePiece vocabularies (Llama-2's and Gemma's shapes).

Each file is read back with the ``gguf`` package (weights equal to lowbit's fake-quantized
ones after llama.cpp's ``w + 1`` norms, metadata as llama.cpp's converter writes it) and
loaded by transformers' own GGUF loader (logits equal to lowbit's fake-quantized model).
llama.cpp itself is not run here.
"""

import json
import warnings

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import ConfigError
from lowbit.export.base import quantized_modules
from tests.export.tiny_tokenizers import (SAMPLE, gemma_tokenizer, llama2_tokenizer,
                                          phi3_tokenizer)
from tests.tiny_models import build

gguf = pytest.importorskip("gguf")

ARCH = {"gemma2": "gemma2", "gemma3": "gemma3", "gemma3_mm": "gemma3", "phi3": "phi3",
        "olmo2": "olmo2", "granite": "granite", "gpt2": "gpt2"}
TEXT_PREFIX = {"gemma3_mm": "model.language_model."}


def _text_cfg(m):
    return getattr(m.config, "text_config", m.config)


def _llama_cpp_attention_scale(m) -> None:
    """llama.cpp's Gemma scales attention by 1/sqrt(head_dim) (no GGUF key says otherwise);
    the tiny configs keep transformers' default query_pre_attn_scalar 256 (head_dim 16), so
    set it and the modules built from it to head_dim, as every released Gemma has it."""
    cfg = _text_cfg(m)
    if getattr(cfg, "query_pre_attn_scalar", None) is None:
        return
    cfg.query_pre_attn_scalar = cfg.head_dim
    for mod in m.modules():
        if hasattr(mod, "q_proj") and hasattr(mod, "scaling"):
            mod.scaling = cfg.head_dim ** -0.5


def _unpermute(w, n_head):
    """Inverse of llama.cpp's q/k row permutation (convert_hf_to_gguf's ``permute``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _model(family, preset="gguf-q4_0"):
    m = build(family)
    _llama_cpp_attention_scale(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vision tower's coverage line (gemma3_mm)
        lowbit.quantize(m, preset)
    return m


def _deq(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                     dtype=np.float32))


def _field(r, key):
    return r.fields[key].contents()


def _save(m, path, **kw):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = lowbit.save(m, path, format="gguf", **kw)
    return gguf.GGUFReader(out / "model.gguf"), [str(w.message) for w in got], out


def _gguf_names(family, n_layers):
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCH[family])
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    prefix = TEXT_PREFIX.get(family)

    def name(key):
        if prefix and key.startswith(prefix):
            key = "model." + key[len(prefix):]
        return tmap.get_name(key, try_suffixes=(".weight", ".bias"))
    return name


@pytest.mark.parametrize("family,preset,kind", [
    ("gemma2", "gguf-q4_0", "Q4_0"), ("gemma3", "gguf-q8_0", "Q8_0"),
    ("gemma3_mm", "gguf-q4_0", "Q4_0"), ("phi3", "gguf-q8_0", "Q8_0"),
    ("olmo2", "gguf-q4_0", "Q4_0"), ("granite", "gguf-q8_0", "Q8_0"),
    ("gpt2", "gguf-q4_0", "Q4_0"),
])
def test_family_reads_back_exactly(tmp_path, family, preset, kind):
    m = _model(family, preset)
    cfg = _text_cfg(m)
    r, warned, _ = _save(m, tmp_path / "g")
    tensors = {t.name: t for t in r.tensors}
    name = _gguf_names(family, cfg.num_hidden_layers)
    n = 0
    for mod_name, mod in quantized_modules(m):
        if ".vision_tower." in mod_name or ".multi_modal_projector." in mod_name:
            continue
        t = tensors[name(mod_name + ".weight")]
        assert t.tensor_type.name == kind, mod_name
        want = mod.weight_2d(mod.quantized_weight()).detach().float()  # [out, in]
        back = _deq(t).reshape(want.shape)
        if family == "granite" and mod_name.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if mod_name.endswith("q_proj") else \
                cfg.num_key_value_heads
            back = _unpermute(back, heads)
        assert torch.equal(back, want), mod_name
        n += 1
    # Phi-3: qkv_proj and gate_up_proj fused; GPT-2: c_attn, c_proj, c_fc, c_proj
    per_layer = 4 if family in ("phi3", "gpt2") else 7
    assert n == per_layer * cfg.num_hidden_layers
    if family == "phi3":  # fused projections kept fused, gate half first (llama.cpp's SwiGLU)
        assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [64, 128]  # ggml: [in, out]
        assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [64, 256]
    norm_offset = 1.0 if family.startswith("gemma") else 0.0  # Gemma: x*(1+w) -> w + 1
    sd = m.state_dict()
    norms = [k for k in sd if ".vision_tower." not in k and k.endswith(".weight") and
             (name(k) or "").endswith("norm.weight")]
    assert len(norms) >= 3
    for k in norms:
        assert torch.equal(_deq(tensors[name(k)]), sd[k].float() + norm_offset), k
    emb = m.get_input_embeddings().weight.detach().float()
    assert torch.equal(_deq(tensors["token_embd.weight"]).reshape(emb.shape), emb)  # unscaled
    # Gemma, GPT-2: tied, no output tensor
    assert ("output.weight" in tensors) == (family in ("phi3", "olmo2", "granite"))
    assert not any(k.startswith(("v.", "mm.")) for k in tensors)
    assert _field(r, "general.architecture") == ARCH[family]
    assert _field(r, "general.file_type") == int(getattr(gguf.LlamaFileType, f"MOSTLY_{kind}"))
    if family == "gemma3_mm":
        assert any("model.vision_tower" in w and "mmproj" in w for w in warned), warned
    else:
        assert not any("mmproj" in w for w in warned)


def test_family_metadata(tmp_path):
    a = ARCH
    r2, _, _ = _save(_model("gemma2"), tmp_path / "g2")
    assert _field(r2, "gemma2.attn_logit_softcapping") == 50.0
    assert _field(r2, "gemma2.final_logit_softcapping") == 30.0
    assert _field(r2, "gemma2.attention.sliding_window") == 8
    assert _field(r2, "gemma2.attention.key_length") == 16
    r3, _, _ = _save(_model("gemma3_mm"), tmp_path / "g3")
    assert "gemma3.attn_logit_softcapping" not in r3.fields  # Gemma-3 has none
    assert "gemma3.final_logit_softcapping" not in r3.fields  # None in this config
    assert _field(r3, "gemma3.attention.sliding_window") == 8
    assert _field(r3, "gemma3.rope.freq_base") == 1_000_000.0  # the global layers' base
    assert _field(r3, "gemma3.block_count") == 2 and _field(r3, "gemma3.vocab_size") == 128
    assert _field(r3, "general.name") == "Gemma3ForConditionalGeneration"
    rp, _, _ = _save(_model("phi3"), tmp_path / "p3")
    assert _field(rp, "phi3.attention.sliding_window") == 0  # none in the config (Phi-4-like)
    assert _field(rp, "phi3.rope.dimension_count") == 16
    assert _field(rp, "phi3.rope.scaling.original_context_length") == 4096
    assert _field(rp, "phi3.context_length") == 256
    rg, _, _ = _save(_model("granite"), tmp_path / "gr")
    for key, want in (("attention.scale", 0.1), ("embedding_scale", 4.0),
                      ("residual_scale", 0.5), ("logit_scale", 2.0)):
        assert abs(_field(rg, f"granite.{key}") - want) < 1e-7, key
    ro, _, _ = _save(_model("olmo2"), tmp_path / "o2")
    assert "olmo2.attention.sliding_window" not in ro.fields
    assert {t.name for t in ro.tensors if t.name.startswith("blk.0.")} == {
        f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                                      "attn_k_norm", "post_attention_norm", "ffn_gate",
                                      "ffn_up", "ffn_down", "post_ffw_norm")}
    r_gpt2, _, _ = _save(_model("gpt2"), tmp_path / "gpt2")
    assert _field(r_gpt2, "gpt2.context_length") == 64
    assert _field(r_gpt2, "gpt2.feed_forward_length") == 256
    assert "gpt2.rope.freq_base" not in r_gpt2.fields
    assert "position_embd.weight" in {t.name for t in r_gpt2.tensors}
    assert set(a.values()) == {"gemma2", "gemma3", "phi3", "olmo2", "granite", "gpt2"}


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gemma3_mm", "phi3", "gpt2"])
def test_transformers_gguf_loader_gives_lowbit_logits(tmp_path, family):
    """transformers dequantizes the file through the gguf package into its own class."""
    import transformers as tf

    m = _model(family)
    _, _, out = _save(m, tmp_path / "g")
    # Phi3Config's default pad/eos ids (32000) lie outside the tiny vocabulary, and the
    # file (written with no tokenizer) has none to say otherwise
    kw = {"pad_token_id": 0, "eos_token_id": 2} if family == "phi3" else {}
    if family == "gpt2":  # its loader maps neither the vocabulary size nor n_positions
        kw = {"vocab_size": 128, "n_positions": 64}
    ref = tf.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf",
                                                  dtype=torch.float32, **kw).eval()
    _llama_cpp_attention_scale(ref)  # transformers' loader reads no attention scale
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = m(ids).logits, ref(ids).logits
    assert type(ref).__name__ == ("Gemma3ForCausalLM" if family == "gemma3_mm"
                                  else type(m).__name__)
    assert float((want - got).abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["olmo2", "granite"])
def test_name_map_reload_gives_lowbit_logits(tmp_path, family):
    """transformers' GGUF loader has no olmo2/granite: load the file into a fresh model of
    the class through the gguf package's own name map (q/k rows un-permuted for granite)."""
    m = _model(family)
    r, _, _ = _save(m, tmp_path / "g")
    tensors = {t.name: t for t in r.tensors}
    fresh = type(m)(m.config).eval()
    name = _gguf_names(family, m.config.num_hidden_layers)
    sd = {}
    for key, p in fresh.state_dict().items():
        w = _deq(tensors[name(key)]).reshape(p.shape)
        if family == "granite" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = m.config.num_attention_heads if "q_proj" in key else \
                m.config.num_key_value_heads
            w = _unpermute(w, heads)
        sd[key] = w
    fresh.load_state_dict(sd)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((m(ids).logits - fresh(ids).logits).abs().max()) < 1e-5


# --- refusals -------------------------------------------------------------------------------
def test_gemma_configs_llama_cpp_cannot_run_are_refused(tmp_path):
    m = build("gemma2")  # query_pre_attn_scalar 256, head_dim 16
    with pytest.raises(ConfigError, match=r"query_pre_attn_scalar = 256.*1/sqrt\(16\)"):
        lowbit.save(m, tmp_path / "a", format="gguf")
    m = _model("gemma3")
    m.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ConfigError, match="layer_types.*fixed pattern"):
        lowbit.save(m, tmp_path / "b", format="gguf")
    m = _model("gemma3")
    m.config.rope_parameters["sliding_attention"]["rope_theta"] = 5000.0
    with pytest.raises(ConfigError, match="sliding-window layers.*10000"):
        lowbit.save(m, tmp_path / "c", format="gguf")
    m = _model("gemma2")
    m.config.final_logit_softcapping = None
    with pytest.raises(ConfigError, match="final_logit_softcapping is None.*default"):
        lowbit.save(m, tmp_path / "e", format="gguf")
    m = _model("gemma3")
    m.config.attn_logit_softcapping = 50.0
    with pytest.raises(ConfigError, match="attn_logit_softcapping.*no such soft-capping"):
        lowbit.save(m, tmp_path / "d", format="gguf")
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_gemma_quantized_lm_head_is_refused(tmp_path):
    m = build("gemma2")
    _llama_cpp_attention_scale(m)
    lowbit.quantize(m, {"name": "t", "targets": [{"pattern": "*", "weight": {
        "format": "int8", "granularity": "group", "group_size": 32, "scale_format": "fp16"}}],
        "exclude": ["*embed*"]})
    with pytest.raises(ConfigError, match="token embedding.*lm_head"):
        lowbit.save(m, tmp_path / "a", format="gguf")


# --- SentencePiece vocabularies ---------------------------------------------------------------
def _tiny_llama(vocab):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)
    return tf.LlamaForCausalLM(cfg).eval()


def _tiny_gemma2(vocab):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          query_pre_attn_scalar=16, sliding_window=8, vocab_size=vocab)
    return tf.Gemma2ForCausalLM(cfg).eval()


def _tiny_phi3(vocab):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.Phi3ForCausalLM(cfg).eval()


def _check_spm_vocab(r, tok, n_vocab):
    T = gguf.TokenType
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    assert len(tokens) == len(types) == len(scores) == n_vocab
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.pre") == "default"
    assert "tokenizer.ggml.merges" not in r.fields  # SentencePiece files carry none
    n = len(tok)
    assert tokens[:n] == tok.convert_ids_to_tokens(list(range(n)))
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n_vocab)]
    assert set(types[n:]) == {T.UNUSED}
    specials = set(tok.all_special_ids) - {tok.unk_token_id}
    for i, text in enumerate(tokens[:n]):
        want = (T.BYTE if text.startswith("<0x") else T.UNKNOWN if i == tok.unk_token_id
                else T.CONTROL if i in specials else T.NORMAL)
        assert types[i] == want, (i, text)
    # BPE scores: minus the rank of the merge that makes the piece (SentencePiece's order)
    rank = {}
    for k, mg in enumerate(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]):
        rank.setdefault("".join(mg), -float(k))
    for i, text in enumerate(tokens[:n]):
        if types[i] == T.NORMAL:
            assert scores[i] == rank.get(text, 0.0), text
    for what, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown")):
        assert _field(r, f"tokenizer.ggml.{key}_token_id") == getattr(tok, f"{what}_token_id")
    assert _field(r, "tokenizer.ggml.add_bos_token") is tok.add_bos_token
    assert _field(r, "tokenizer.ggml.add_eos_token") is False
    assert _field(r, "tokenizer.chat_template") == tok.chat_template


@pytest.mark.parametrize("kind", ["llama2", "gemma", "phi3"])
def test_sentencepiece_vocab_as_llama_cpp_converter_writes_it(tmp_path, kind):
    """transformers' GGUF tokenizer loader picks its builder by architecture (llama: the
    Metaspace tokenizer; gemma2: Gemma's; phi3: the legacy normalizer one)."""
    from transformers import AutoTokenizer

    tok = {"llama2": llama2_tokenizer, "gemma": gemma_tokenizer, "phi3": phi3_tokenizer}[kind]()
    n_vocab = 416
    m = {"llama2": _tiny_llama, "gemma": _tiny_gemma2, "phi3": _tiny_phi3}[kind](n_vocab)
    r, _, out = _save(m, tmp_path / "g", tokenizer=tok)
    _check_spm_vocab(r, tok, n_vocab)
    assert _field(r, "tokenizer.ggml.add_space_prefix") is (kind != "gemma")
    if kind == "gemma":
        assert _field(r, "tokenizer.ggml.padding_token_id") == 0
        assert r.fields["tokenizer.ggml.token_type"].contents()[5] == gguf.TokenType.CONTROL
    # transformers' GGUF tokenizer loader rebuilds the same tokenizer from the file
    back = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    for text in (SAMPLE, " leading space", "Netherfield<start_of_turn>x", "ünïcödé 1811",
                 "a<|end|>b"):
        assert back.encode(text) == tok.encode(text), text
    msgs = [{"role": "user", "content": "Is Netherfield let?"}]
    assert back.apply_chat_template(msgs, tokenize=False) == \
        tok.apply_chat_template(msgs, tokenize=False)


def test_unknown_tokenizer_kind_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(ConfigError, match="neither.*tokenizer=None"):
        lowbit.save(_tiny_llama(32), tmp_path / "a", format="gguf", tokenizer=tok)


def test_phi3_longrope_factors(tmp_path):
    """Phi-3-128k / Phi-3.5: rope_factors_long/short tensors and the attention factor, as
    llama.cpp's converter writes them."""
    import math

    import transformers as tf

    torch.manual_seed(0)
    long, short = [1.0 + i / 8 for i in range(8)], [1.0] * 8
    cfg = tf.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                        max_position_embeddings=1024, original_max_position_embeddings=256,
                        pad_token_id=0, eos_token_id=2, rope_scaling={
                            "type": "longrope", "long_factor": long, "short_factor": short})
    r, _, _ = _save(tf.Phi3ForCausalLM(cfg).eval(), tmp_path / "g")
    t = {t.name: t for t in r.tensors}
    assert t["rope_factors_long.weight"].data.tolist() == long
    assert t["rope_factors_short.weight"].data.tolist() == short
    assert math.isclose(_field(r, "phi3.rope.scaling.attn_factor"),
                        math.sqrt(1 + math.log(4) / math.log(256)), rel_tol=1e-6)
    assert _field(r, "phi3.rope.scaling.original_context_length") == 256


def test_unigram_vocab_keeps_its_scores(tmp_path):
    """A Unigram tokenizer.json (SentencePiece unigram) has its own scores: written as they are."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("\u2581", -2.0), ("a", -3.0),
             ("b", -3.5), ("\u2581a", -1.5), ("ab", -2.5)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    r, _, _ = _save(_tiny_llama(32), tmp_path / "g", tokenizer=tok)
    scores = r.fields["tokenizer.ggml.scores"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert scores[3:8] == [s for _, s in vocab[3:]]
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                         gguf.TokenType.CONTROL, gguf.TokenType.NORMAL]
    assert _field(r, "tokenizer.ggml.add_space_prefix") is True
    with pytest.raises(ConfigError, match="tokenizer_pre 'llama-bpe'.*default"):
        lowbit.save(_tiny_llama(32), tmp_path / "h", format="gguf", tokenizer=tok,
                    tokenizer_pre="llama-bpe")


def _llama_cpp_spm(tokens, scores, text, space_prefix) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (``llm_tokenizer_spm`` in llama-vocab.cpp),
    re-implemented for plain text: spaces -> ``▁`` (one prefixed when ``space_prefix``), UTF-8
    characters merged pairwise, the highest-scoring vocabulary piece first (ties: leftmost),
    pieces not in the vocabulary re-split along their merges, then as ``<0xNN>`` bytes."""
    import heapq

    ids = {t: i for i, t in enumerate(tokens)}
    text = ("\u2581" if space_prefix else "") + text.replace(" ", "\u2581")
    sym = [[c, i - 1, i + 1] for i, c in enumerate(text)]  # [text, prev, next]
    sym[-1][2] = -1
    queue, rev = [], {}

    def bigram(left, right):
        if left < 0 or right < 0 or sym[left][0] + sym[right][0] not in ids:
            return
        t = sym[left][0] + sym[right][0]
        heapq.heappush(queue, (-scores[ids[t]], left, right, len(t)))
        rev[t] = (sym[left][0], sym[right][0])

    for i in range(1, len(sym)):
        bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not sym[left][0] or not sym[right][0] or \
                len(sym[left][0]) + len(sym[right][0]) != size:
            continue
        sym[left][0] += sym[right][0]
        sym[right][0], sym[left][2] = "", sym[right][2]
        if sym[right][2] >= 0:
            sym[sym[right][2]][1] = left
        bigram(sym[left][1], left)
        bigram(left, sym[left][2])
    out = []

    def resegment(t):
        if t in ids:
            out.append(ids[t])
        elif t in rev:
            resegment(rev[t][0])
            resegment(rev[t][1])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in t.encode())

    i = 0
    while i != -1:
        resegment(sym[i][0])
        i = sym[i][2]
    return out


@pytest.mark.parametrize("kind", ["llama2", "gemma", "phi3"])
def test_llama_cpp_spm_algorithm_on_the_written_scores_gives_the_tokenizers_ids(tmp_path,
                                                                                 kind):
    """llama.cpp is not installed here: its SentencePiece algorithm, run on the tokens and
    scores written, gives the ids of the tokenizer (the scores order the merges right)."""
    tok = {"llama2": llama2_tokenizer, "gemma": gemma_tokenizer, "phi3": phi3_tokenizer}[kind]()
    m = {"llama2": _tiny_llama, "gemma": _tiny_gemma2, "phi3": _tiny_phi3}[kind](416)
    r, _, _ = _save(m, tmp_path / "g", tokenizer=tok)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    prefix = _field(r, "tokenizer.ggml.add_space_prefix")
    texts = [SAMPLE, "It is a truth universally acknowledged", "ünïcödé 1811 🦙 Zq"]
    if kind != "llama2":  # transformers' Metaspace prefixes no ▁ before a leading space,
        texts.append("  two  spaces")  # llama.cpp (and SentencePiece) always do
    for text in texts:
        assert _llama_cpp_spm(tokens, scores, text, prefix) == \
            tok.encode(text, add_special_tokens=False), text
