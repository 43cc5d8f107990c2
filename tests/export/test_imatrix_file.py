"""llama.cpp imatrix files: lowbit.calib.imatrix_file reads and writes them.

The ``external`` tests run llama.cpp's own ``llama-imatrix`` / ``llama-quantize`` (built in
the cache folder bench/gguf_contest.py uses; skipped without them) on a tiny F32 GGUF written by
lowbit: lowbit reads what llama-imatrix writes (GGUF and the legacy .dat), and
llama-quantize accepts what lowbit writes.
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowbit.calib.imatrix_file import imatrix_means, read_imatrix, write_imatrix
from lowbit.errors import CheckpointError, ConfigError

gguf = pytest.importorskip("gguf")

LLAMA_BIN = Path("/work/cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
needs_imatrix = pytest.mark.skipif(not (LLAMA_BIN / "llama-imatrix").exists(),
                                   reason=f"needs llama.cpp's llama-imatrix in {LLAMA_BIN}")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "blk.0.attn_q.weight": (rng.random((1, 64), dtype=np.float32) * 100,
                                np.array([256.0], np.float32)),
        "blk.0.ffn_down_exps.weight": (rng.random((4, 32), dtype=np.float32),
                                       np.array([10.0, 0.0, 3.0, 7.0], np.float32)),
    }


def test_round_trip_and_layout(tmp_path):
    data = _data()
    p = tmp_path / "im.gguf"
    write_imatrix(p, data, dataset="calib.txt", chunks=4, chunk_size=64)
    back, meta = read_imatrix(p, with_meta=True)
    assert meta == {"datasets": ["calib.txt"], "chunk_count": 4, "chunk_size": 64,
                    "legacy": False}
    assert set(back) == set(data)
    for k, (s, c) in data.items():
        assert np.array_equal(back[k][0], s) and np.array_equal(back[k][1], c)
    # the layout llama-imatrix writes: F32 NAME.in_sum2 ne={I, n_mat}, NAME.counts ne={1, n_mat}
    r = gguf.GGUFReader(p)
    t = {t.name: t for t in r.tensors}
    assert [int(x) for x in t["blk.0.ffn_down_exps.weight.in_sum2"].shape] == [32, 4]
    assert [int(x) for x in t["blk.0.ffn_down_exps.weight.counts"].shape] == [1, 4]
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in r.tensors)
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    # llama-quantize's normalisation: sums / count per matrix, 1 where a matrix saw nothing
    m = imatrix_means(*back["blk.0.ffn_down_exps.weight"])
    s = data["blk.0.ffn_down_exps.weight"][0]
    assert np.allclose(m[0], s[0] / 10) and np.all(m[1] == 1) and np.allclose(m[3], s[3] / 7)
    assert not list(tmp_path.glob("*.tmp"))


def test_torch_inputs_and_1d_sums(tmp_path):
    import torch

    p = tmp_path / "im.gguf"
    write_imatrix(p, {"blk.1.ffn_up.weight": (torch.ones(16), 5)})
    s, c = read_imatrix(p)["blk.1.ffn_up.weight"]
    assert s.shape == (1, 16) and c.tolist() == [5.0]


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_imatrix(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"\x00\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="neither GGUF nor a legacy"):
        read_imatrix(tmp_path / "junk.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_imatrix(tmp_path / "bad.gguf")
    (tmp_path / "short.dat").write_bytes(np.array([1, 4], np.int32).tobytes() + b"blk.")
    with pytest.raises(CheckpointError, match="truncated"):
        read_imatrix(tmp_path / "short.dat")
    with pytest.raises(ConfigError, match="expected \\[n_mat, I\\] and \\[n_mat\\]"):
        write_imatrix(tmp_path / "x.gguf", {"a.weight": (np.ones((2, 4)), np.ones(3))})
    with pytest.raises(ConfigError, match="negative or non-finite"):
        write_imatrix(tmp_path / "x.gguf", {"a.weight": (-np.ones((1, 4)), np.ones(1))})
    with pytest.raises(ConfigError, match="non-empty dict"):
        write_imatrix(tmp_path / "x.gguf", {})
    with pytest.raises(ConfigError, match="folder"):
        write_imatrix(tmp_path / "no" / "x.gguf", _data())
    assert not (tmp_path / "x.gguf").exists()
    # a model GGUF is not an imatrix: sums without counts
    p = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="in_sum2 but no counts"):
        read_imatrix(p)


def test_legacy_dat_reads(tmp_path):
    """.dat: n_entries, per entry (len, name, ncall, nval, mean(x^2)*ncall), chunks, dataset."""
    vals = np.arange(1, 9, dtype=np.float32)
    name = b"blk.0.ffn_up.weight"
    raw = np.array([1, len(name)], np.int32).tobytes() + name + \
        np.array([4, 8], np.int32).tobytes() + vals.tobytes() + \
        np.array([4, 5], np.int32).tobytes() + b"t.txt"
    (tmp_path / "im.dat").write_bytes(raw)
    data, meta = read_imatrix(tmp_path / "im.dat", with_meta=True)
    assert meta["legacy"] and meta["chunk_count"] == 4 and meta["datasets"] == ["t.txt"]
    s, c = data["blk.0.ffn_up.weight"]
    assert s.shape == (1, 8) and c.tolist() == [4.0]
    assert np.allclose(imatrix_means(s, c), vals / 4)


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    import lowbit
    from tests.export.tiny_tokenizers import TEXT, llama2_tokenizer
    from tests.tiny_models import build

    d = tmp_path_factory.mktemp("imat")
    out = lowbit.save(build("llama2_sp"), d / "g", format="gguf", tokenizer=llama2_tokenizer())
    (d / "text.txt").write_text(" ".join(TEXT * 20))
    return out / "model.gguf", d / "text.txt"


def _run(*args):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.mark.external
@needs_imatrix
def test_reads_what_llama_imatrix_writes(f32_gguf, tmp_path):
    model, text = f32_gguf
    common = ["-m", model, "-f", text, "-c", "64", "-b", "64", "--chunks", "4", "-t", "1",
              "--no-ppl"]
    _run(LLAMA_BIN / "llama-imatrix", *common, "-o", tmp_path / "im.gguf")
    _run(LLAMA_BIN / "llama-imatrix", *common, "-o", tmp_path / "im.dat",
         "--output-format", "dat")
    data, meta = read_imatrix(tmp_path / "im.gguf", with_meta=True)
    assert meta["chunk_count"] == 4 and meta["chunk_size"] == 64 and not meta["legacy"]
    assert meta["datasets"] == [str(text)]
    names = {f"blk.{i}.{t}.weight" for i in range(2) for t in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(data) == names
    s, c = data["blk.0.attn_q.weight"]
    assert s.shape == (1, 64) and c.tolist() == [256.0] and (s > 0).all()
    assert np.array_equal(data["blk.0.attn_q.weight"][0], data["blk.0.attn_k.weight"][0])
    legacy = read_imatrix(tmp_path / "im.dat")
    for k in names:  # the same means either way
        assert np.allclose(imatrix_means(*legacy[k]), imatrix_means(*data[k]), rtol=1e-6)


@pytest.mark.external
@needs_imatrix
def test_llama_quantize_reads_what_lowbit_writes(f32_gguf, tmp_path):
    model, _ = f32_gguf
    names = [f"blk.{i}.{t}.weight" for i in range(2) for t in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")]
    rng = np.random.default_rng(0)
    data = {n: (rng.random((1, 64), dtype=np.float32), np.array([100.0], np.float32))
            for n in names}
    data.update({f"blk.{i}.ffn_down.weight": (rng.random((1, 128), dtype=np.float32),
                                              np.array([100.0], np.float32)) for i in range(2)})
    write_imatrix(tmp_path / "im.gguf", data, dataset="mine.txt", chunks=2, chunk_size=50)
    log = _run(LLAMA_BIN / "llama-quantize", "--imatrix", tmp_path / "im.gguf", model,
               tmp_path / "q.gguf", "IQ4_NL", "1")
    assert "loaded 14 importance matrix entries" in log and "mine.txt" in log
