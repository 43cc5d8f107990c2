"""`lowbit quantize -r gguf-q4_k_m --algorithm gptq --calib TEXT -f gguf` as a user runs it,
and the command line's llama-quantize options (--embedding-type, --output-type, --pure)."""

import subprocess
import sys

import pytest

from tests.cli.test_cli_quantize import model_dir, run  # noqa: F401  (fixture)


def test_recipes_lists_the_mixes():
    p = subprocess.run([sys.executable, "-m", "lowbit", "recipes"], capture_output=True,
                       text=True, timeout=120, env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    for name in ("gguf-q4_k_m", "gguf-q4_k_m-gptq", "gguf-iq4_xs-imatrix", "gguf-q2_k-awq"):
        assert name in p.stdout
    row = next(ln for ln in p.stdout.splitlines() if "gguf-q3_k_m-gptq " in ln)
    assert "GGUF mix Q3_K_M" in row and "gptq" in row


@pytest.mark.parametrize("extra,msg", [
    (["--algorithm", "magic"], "--algorithm 'magic'; expected one of:"),
    (["-r", "int8", "--pure"], "--pure is for gguf-\\* mix presets"),
    (["-r", "int8", "--embedding-type", "q8_0"], "--embedding-type is only for --format gguf"),
    (["--imatrix", "/no/such.gguf"], "--imatrix /no/such.gguf: no such file"),
    (["--algorithm", "gptq"], "needs calibration data: pass --calib"),
    (["--output-type", "q9_k"], "output_type 'q9_k'"),
])
def test_bad_options(model_dir, tmp_path, extra, msg):  # noqa: F811
    import re

    d, _ = model_dir
    args = ["quantize", str(d), "-o", str(tmp_path / "q")]
    if "-r" not in extra:
        args += ["-r", "gguf-q4_k_m"]
    rc, o, e = run(*args, *extra)
    assert rc == 2 and re.search(msg, " ".join((o + e).split())), (o, e)


def test_quantize_mix_gptq_to_gguf(model_dir, tmp_path):  # noqa: F811
    import gguf

    d, text = model_dir
    out = tmp_path / "q"
    rc, o, e = run("quantize", str(d), "-r", "gguf-q4_k_m", "--algorithm", "gptq", "--calib",
                   str(text), "--samples", "4", "--seq-len", "32", "-f", "gguf",
                   "--output-type", "q4_0", "--no-vocab", "-o", str(out))
    assert rc == 0, e
    # the preset + --algorithm gptq is its -gptq variant
    assert "gguf-q4_k_m-gptq: Q4_K_M, token_embd Q5_0, output Q4_0" in o
    r = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    # the tiny Llama (hidden 64): llama.cpp's fallbacks Q4_K -> Q5_0, Q6_K -> Q8_0
    assert types["blk.0.attn_q.weight"] == "Q5_0"
    assert types["blk.1.attn_v.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["output.weight"] == "Q4_0"   # --output-type (the mix's rule: Q8_0)
    assert types["token_embd.weight"] == "Q5_0"  # untied: the default Q4_K, fallen back


def test_quantize_mix_with_imatrix_file(model_dir, tmp_path):  # noqa: F811
    """--imatrix FILE (llama-imatrix's format): no --calib needed, the mix sees an imatrix."""
    import gguf
    import numpy as np

    from lowbit.adapters.gguf_names import gguf_tensor_names
    from lowbit.calib.imatrix_file import write_imatrix
    from tests.tiny_models import build

    d, _ = model_dir
    data = {t.name: (np.full((1, t.n_cols), 2.0, np.float32), np.ones(1, np.float32))
            for t in gguf_tensor_names(build("llama")).values() if t.name.startswith("blk.")}
    im = tmp_path / "imatrix.gguf"
    write_imatrix(im, data, dataset="x", chunks=1, chunk_size=1)
    out = tmp_path / "q"
    rc, o, e = run("quantize", str(d), "-r", "gguf-iq4_xs", "--imatrix", str(im), "-f", "gguf",
                   "--no-vocab", "-o", str(out))
    assert rc == 0, e
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "IQ4_NL"  # IQ4_XS -> IQ4_NL at 64 columns
