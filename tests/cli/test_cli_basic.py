"""The lowbit command run as a user would: a subprocess, exit codes, one-line errors."""

import subprocess
import sys

import pytest


def run(*args):
    p = subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_formats_table():
    rc, out, _ = run("formats")
    assert rc == 0
    for name in ["int4", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "e8m0",
                 "nvfp4", "mxfp4"]:
        assert name in out
    assert "448" in out and "57344" in out


def test_recipes_list():
    rc, out, _ = run("recipes")
    assert rc == 0 and "int4-weight-only" in out and "nvfp4" in out


def test_estimate_reproduces_the_source_tables():
    rc, out, _ = run("estimate", "--params", "70B")
    assert rc == 0
    lines = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.count("│") > 3}
    for prec, gb in [("fp32", "280.0"), ("fp16", "140.0"), ("fp8", "70.0"), ("int8", "70.0")]:
        assert gb in lines[prec], lines[prec]
    assert "35.0" in lines["int4"]  # the codes; scales for group 128 add 1.1 GB
    rc, out, _ = run("estimate", "llama-2-7b")
    lines = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.count("│") > 3}
    assert "13.5" in lines["fp16"] and "6.7" in lines["fp8"]
    assert "KV cache (fp16): 2.15 GB for 1 x 4096 tokens" in out


def test_estimate_reads_config(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, '
        '"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, '
        '"vocab_size": 49152, "tie_word_embeddings": true}')
    rc, out, _ = run("estimate", str(tmp_path), "--kv-format", "fp8")
    assert rc == 0 and "0.13B" in out and "KV cache (fp8)" in out


@pytest.mark.parametrize("args,msg", [
    (["estimate", "--params", "7X"], "expected a number like 70B"),
    (["estimate", "no-such-model"], "unknown model 'no-such-model'"),
    (["estimate"], "give a parameter count like 70B, a MODEL"),
    (["recommend", "--goal", "fastest"], "unknown goal 'fastest'"),
])
def test_bad_input_exits_2_with_one_line(args, msg):
    rc, out, err = run(*args)
    assert rc == 2
    assert msg in err
    assert len(err.strip().splitlines()) == 1


def test_recommend():
    rc, out, _ = run("recommend", "--goal", "inference-int8")
    assert rc == 0 and "SmoothQuant" in out
