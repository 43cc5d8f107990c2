"""Streaming block-by-block quantization of a checkpoint on disk: the output equals an
in-memory quantize + save of the same model, one block is materialized at a time, bad input
gets a clear error."""

import json
import warnings

import pytest
import torch

import lowbit
from lowbit.errors import CalibrationError, CheckpointError, ConfigError
from lowbit.export.safe_read import read_checkpoint
from lowbit.pipeline import quantize_checkpoint
from lowbit.pipeline import stream as S
from lowbit.pipeline.source import SafetensorsSource
from tests.tiny_models import build, calib_ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(family="llama", layers=4, dtype=torch.float32, **kw):
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, **kw)
        m = tf.LlamaForCausalLM(cfg)
    elif family == "gemma3":  # alternating sliding-window and global layers
        cfg = tf.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention",
                                               "sliding_attention"])
        m = tf.Gemma3ForCausalLM(cfg)
    else:
        m = build(family)
    return m.to(dtype).eval()


def save_src(model, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kw)
    return path


def in_memory(src, preset, ids, out, dtype=torch.float32, **kw):
    import transformers as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tf.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    lowbit.quantize(m, preset, calib_data=ids, blockwise=True, **kw)
    lowbit.save(m, out)
    return m


def assert_same_checkpoint(a, b):
    ma, ta, _ = read_checkpoint(a)
    mb, tb, _ = read_checkpoint(b)
    assert ma == mb
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == \
        json.loads((b / "config.json").read_text())


CASES = [("llama", "int4-gptq", torch.float32), ("llama", "int8-smoothquant", torch.float32),
         ("llama", "w4a8-awq", torch.float32), ("llama-tied", "int4-gptq", torch.bfloat16),
         ("gemma3", "int4-awq", torch.float32), ("gpt2", "int4-gptq", torch.float32),
         ("llama", "int8", torch.float32)]


@pytest.mark.parametrize("family,preset,dtype", CASES)
def test_stream_equals_in_memory(tmp_path, family, preset, dtype):
    """Tensor for tensor (and metadata, config, logits) the same as quantize + save."""
    kw = {"tie_word_embeddings": True} if family == "llama-tied" else {}
    model = tiny(family.split("-")[0], dtype=dtype, **kw)
    src = save_src(model, tmp_path / "src", max_shard_size="60KB")  # several shards + index
    ids = calib_ids(6, 16)
    opts = dict(chunk_size=4, **({"group_size": 32} if "4" in preset else {}))
    if preset == "int8":
        opts["kv_cache"] = "fp8"
    rows = []
    r = quantize_checkpoint(src, preset, ids, tmp_path / "stream",
                            progress=lambda i, n, name: rows.append((i, n, name)), **opts)
    assert r.resumed_from == 0 and len(r.blocks) == len(rows) == rows[-1][1]
    assert not (tmp_path / ".stream.partial").exists()  # the work folder is gone
    in_memory(src, preset, ids, tmp_path / "mem", dtype=dtype, **opts)
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "mem")
    a, b = lowbit.load(tmp_path / "stream"), lowbit.load(tmp_path / "mem")
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_weight_only_needs_no_data_and_one_shard_per_block(tmp_path):
    src = save_src(tiny(layers=3), tmp_path / "src")
    r = quantize_checkpoint(src, "int4-weight-only", None, tmp_path / "out", group_size=32)
    assert [b["block"] for b in r.blocks] == [f"model.layers.{i}" for i in range(3)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # 3 blocks + embeddings/norm/head
    in_memory(src, "int4-weight-only", None, tmp_path / "mem", group_size=32)
    assert_same_checkpoint(tmp_path / "out", tmp_path / "mem")


def test_one_block_materialized_at_a_time(tmp_path, monkeypatch):
    """Parameters loaded from disk: the rest + block 0 during capture, then one block."""
    src = save_src(tiny(layers=4), tmp_path / "src")
    live: dict[str, int] = {}
    peak = {"parts": 0, "during_blocks": 0}
    real_m, real_r = S.materialize, S.release

    def mat(model, part, *a, **k):
        n = real_m(model, part, *a, **k)
        live[part or "(rest)"] = n
        peak["parts"] = max(peak["parts"], len(live))
        if part:
            peak["during_blocks"] = max(peak["during_blocks"],
                                        sum(1 for p in live if p != "(rest)"))
        return n

    def rel(model, part, *a, **k):
        live.pop(part or "(rest)", None)
        return real_r(model, part, *a, **k)

    monkeypatch.setattr(S, "materialize", mat)
    monkeypatch.setattr(S, "release", rel)
    quantize_checkpoint(src, "int4-gptq", calib_ids(4, 16), tmp_path / "out", group_size=32)
    assert peak == {"parts": 2, "during_blocks": 1}
    assert live == {}


def test_source_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    ts = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64),
          "c": torch.randn(2, 2).half(), "d": torch.randn(4).to(torch.float8_e4m3fn),
          "e": torch.zeros(0, 3), "f": torch.tensor([True, False])}
    save_file(ts, str(tmp_path / "model.safetensors"))
    src = SafetensorsSource(tmp_path)
    ref = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(src.keys()) == sorted(ts)
    for k in ts:
        got = src.read(k)
        assert got.dtype == ref[k].dtype and torch.equal(got.view(torch.uint8),
                                                         ref[k].view(torch.uint8)), k
    assert src.read("a", torch.float32).dtype == torch.float32
    assert src.read("b", torch.float32).dtype == torch.int64  # only floats are cast


def test_bad_input_errors(tmp_path):
    src = save_src(tiny(layers=2), tmp_path / "src")
    ids = calib_ids(2, 8)
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        quantize_checkpoint(src, "int4-gptq", ids, tmp_path / "exists")
    with pytest.raises(CalibrationError, match="calibration data"):
        quantize_checkpoint(src, "int4-gptq", None, tmp_path / "o1")
    with pytest.raises(CheckpointError, match="not a model folder"):
        quantize_checkpoint(tmp_path / "nowhere", "int4-gptq", ids, tmp_path / "o2")
    lm_static = {"targets": [{"pattern": "*", "weight": "int8", "input": "int8"}],
                 "exclude": []}
    with pytest.raises(ConfigError, match="lm_head"):
        quantize_checkpoint(src, lm_static, ids, tmp_path / "o3")
    with pytest.raises(ConfigError, match="feed"):
        quantize_checkpoint(src, "int4-gptq", ids, tmp_path / "o4", feed="float")
    # a truncated shard, and a missing tensor, name the file / tensor
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        quantize_checkpoint(src, "int4-gptq", ids, tmp_path / "o5")
    from safetensors.torch import save_file

    good = dict(tiny(layers=2).state_dict())
    del good["model.layers.1.mlp.up_proj.weight"]
    save_file({k: v.contiguous() for k, v in good.items() if k != "lm_head.weight"}
              | {"lm_head.weight": good["lm_head.weight"].clone()}, str(f))
    with pytest.raises(CheckpointError, match="up_proj.weight' is missing"):
        quantize_checkpoint(src, "int4-gptq", ids, tmp_path / "o6", group_size=32)
    assert not (tmp_path / "o6").exists()
