"""bench/gguf_contest.py's pieces that need neither the real model nor llama.cpp: parsing llama.cpp's
output, running tools, GGUF sizes and types, the table and verdicts, the command line."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_gguf", ROOT / "bench" / "gguf_contest.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# the tail of a real `llama-perplexity --kl-divergence` run (Q4_K_M vs F32, 2 chunks)
KLD_OUT = """\
0.00.330.729 I kl_divergence: computing over 2 chunks, n_ctx=512, batch_size=2048, n_seq=4
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      27.1286 ±    4.6131       0.00098 ±    0.02510       0.05539 ±    0.00347     5.215 ±  0.786 %    84.706 ±  2.258 %
====== Perplexity statistics ======
Mean PPL(Q)                   :  26.265968 ±   3.207719
Mean PPL(base)                :  26.389670 ±   3.213240
====== KL divergence statistics ======
Mean    KLD:   0.051325 ±   0.002116
Maximum KLD:   0.401929
99.0%   KLD:   0.242062
Median  KLD:   0.037786
====== Token probability statistics ======
RMS Δp    :  4.993 ± 0.504 %
Same top p: 84.902 ± 1.587 %
"""
BASE_OUT = """\
0.00.897.386 I perplexity: calculating perplexity over 2 chunks, n_ctx=512, batch_size=2048, n_seq=4
[1]27.1022,[2]26.3897,
0.07.438.749 I Final estimate: PPL = 26.3897 +/- 3.21324
"""


def test_parse_kld_and_base():
    k = bench.parse_kld(KLD_OUT)
    assert k == {"ppl": 26.265968, "ppl_base": 26.38967, "kld": 0.051325, "kld_err": 0.002116,
                 "kld_median": 0.037786, "kld_p99": 0.242062, "top1_pct": 84.902, "chunks": 2}
    assert bench.parse_base_ppl(BASE_OUT) == {"ppl": 26.3897, "ppl_err": 3.21324, "chunks": 2}
    assert bench.parse_imatrix("compute_imatrix: computing over 8 chunks, n_ctx=512")["chunks"] == 8


def test_parse_errors_name_what_is_missing():
    with pytest.raises(bench.ToolError, match="Mean KLD"):
        bench.parse_kld(KLD_OUT.replace("Mean    KLD", "Mean KL-D"))
    with pytest.raises(bench.ToolError, match="final PPL"):
        bench.parse_base_ppl("perplexity: crashed")


def test_run_tool_reports_exit_and_timeout(tmp_path):
    out = bench.run_tool(["sh", "-c", "echo hello"], tmp_path / "ok.log", 30)
    assert out.strip() == "hello" and (tmp_path / "ok.log").read_text().strip() == "hello"
    with pytest.raises(bench.ToolError, match=r"sh exited with 3: boom \(log "):
        bench.run_tool(["sh", "-c", "echo boom; exit 3"], tmp_path / "bad.log", 30)
    with pytest.raises(bench.ToolError, match="timed out after 1 s"):
        bench.run_tool(["sleep", "5"], tmp_path / "slow.log", 1)


def test_find_tools(tmp_path):
    assert bench.find_tools(None) is None
    assert bench.find_tools(tmp_path) is None
    for t in bench.TOOLS:
        (tmp_path / t).write_text("#!/bin/sh\n")
        (tmp_path / t).chmod(0o755)
    assert set(bench.find_tools(tmp_path)) == set(bench.TOOLS)
    (tmp_path / "llama-imatrix").unlink()
    assert bench.find_tools(tmp_path) is None


def test_gguf_stats_and_mix_diff(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    a = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("a.weight", a)
    q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    st = bench.gguf_stats(tmp_path / "t.gguf")
    assert st["types"] == {"a.weight": "F32", "b.weight": "Q8_0"}
    assert st["bits_per_weight"] == pytest.approx((32 + 8.5) / 2)  # Q8_0: 34 bytes / 32
    assert st["bytes"] == (tmp_path / "t.gguf").stat().st_size
    assert bench.mix_diff(st["types"], st["types"]) == "same types"
    assert bench.mix_diff(st["types"], {"a.weight": "F32", "b.weight": "Q4_K"}) == \
        "1 tensors differ (b.weight: Q8_0 vs Q4_K)"


def _row(typ, method, nbytes, kld, ppl):
    return {"type": typ, "method": method, "bytes": nbytes, "size_mb": nbytes / 1e6,
            "bits_per_weight": 4.5, "ppl": ppl, "delta_ppl_pct": 1.0, "kld": kld,
            "top1_pct": 90.0, "time_s": 1.0}


def test_verdicts_and_table():
    rows = [_row("q4_k_m", "llama-imatrix", 100, 0.03, 29.0),
            _row("q4_k_m", "lowbit-imatrix", 100, 0.02, 28.5),
            _row("q4_k_m", "lowbit-gptq", 101, 0.01, 28.0),
            _row("q3_k_m", "lowbit-gptq", 90, 0.04, 30.0),
            {"type": "q2_k", "method": "lowbit", "skipped": "preset gguf-q2_k missing"}]
    v = bench.verdicts(rows)
    assert v[0].startswith("q4_k_m: lowbit imatrix vs llama-quantize+imatrix: size 1.000x, "
                           "KL 0.667x") and v[0].endswith("goal met")
    assert v[1].endswith("goal NOT met")  # larger file
    assert v[2].startswith("best lowbit q3_k_m (lowbit-gptq) vs llama q4_k_m+imatrix")
    t = bench.table(rows, {})
    assert "preset gguf-q2_k missing" in t and t.count("\n") == len(rows) + 1


def test_args():
    a = bench.parse_args(["--quick"])
    assert (a.types, a.chunks, a.calib_samples) == (["q4_k_m", "q3_k_m"], 4, 8)
    a = bench.parse_args(["--types", "q6_k", "--chunks", "16"])
    assert (a.types, a.chunks, a.calib_samples, a.methods) == (["q6_k"], 16, 32,
                                                                list(bench.METHODS))
    for bad in (["--types", "q4_k"], ["--methods", "awq"], ["--chunks", "0"],
                ["--seq-len", "511"], ["--bogus"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_running_as_script_does_not_shadow_the_gguf_package():
    assert str(ROOT / "bench") not in sys.path
