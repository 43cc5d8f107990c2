"""`lowbit quantize --format onnx|gguf|compressed-tensors` and `lowbit export`, run as a user."""

import os
import subprocess
import sys

import pytest
import torch

from tests.cli.test_cli_quantize import model_dir, quantized_checkpoint  # noqa: F401


def run(*args):
    p = subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def native(model_dir, tmp_path_factory):  # noqa: F811
    return quantized_checkpoint(model_dir, tmp_path_factory, "int4-weight-only", 16)


def test_quantize_writes_onnx_that_runs_at_other_lengths(model_dir, tmp_path):  # noqa: F811
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    d, text = model_dir
    out = tmp_path / "onnx"
    rc, o, e = run("quantize", str(d), "--recipe", "int8", "--calib", str(text), "--samples",
                   "2", "--seq-len", "32", "--out", str(out), "--format", "onnx")
    assert rc == 0, e
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    for shape in [(1, 5), (3, 23)]:  # traced at (2, 16): batch and length are dynamic
        ids = torch.randint(0, 28, shape).numpy()
        (logits,) = sess.run(["logits"], {"input_ids": ids})
        assert logits.shape == (*shape, 128)  # the tiny model's vocabulary


def test_quantize_to_gguf_names_the_flags(model_dir, tmp_path):  # noqa: F811
    d, _ = model_dir
    args = ["quantize", str(d), "-r", "int4-weight-only", "--group-size", "16", "-f", "gguf",
            "-o", str(tmp_path / "g")]
    rc, o, e = run(*args)
    assert rc == 2 and "Pass --allow-requantize to requantize" in e, e
    assert not (tmp_path / "g").exists()
    rc, o, e = run(*args, "--allow-requantize", "--no-vocab")
    assert rc == 0, e
    files = list((tmp_path / "g").iterdir())
    assert files and all(f.stat().st_mode & 0o777 == 0o666 & ~_umask() for f in files)


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_export_native_to_other_formats(native, tmp_path):
    import lowbit

    ref = lowbit.load(native)
    x = torch.randint(0, 28, (1, 12))
    with torch.no_grad():
        want = ref(x).logits
    rc, o, e = run("export", str(native), "--format", "compressed-tensors", "--out",
                   str(tmp_path / "ct"))
    assert rc == 0, e
    assert (tmp_path / "ct" / "config.json").exists() and "compressed-tensors" in o
    rc, o, e = run("export", str(native), "--format", "gguf", "--out", str(tmp_path / "g"))
    assert rc == 2 and "ggml blocks hold 32 values" in e  # int4 g16: not exact in GGUF
    assert "--allow-requantize" in e and "allow_requantize=True" not in e  # the CLI's flag
    assert not (tmp_path / "g").exists()
    rc, o, e = run("export", str(native), "--format", "gguf", "--out", str(tmp_path / "g"),
                   "--allow-requantize")
    assert rc == 2 and "byte-level BPE" in e  # the tiny model's tokenizer is word-level
    assert "--no-vocab" in e and "tokenizer=None" not in e
    rc, o, e = run("export", str(native), "--format", "gguf", "--out", str(tmp_path / "g"),
                   "--allow-requantize", "--no-vocab")
    assert rc == 0, e
    assert list((tmp_path / "g").glob("*.gguf"))
    rc, o, e = run("export", str(native), "--format", "lowbit", "--out", str(tmp_path / "n"))
    assert rc == 0, e
    with torch.no_grad():
        got = lowbit.load(tmp_path / "n")(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # codes and scales kept to the bit


@pytest.mark.parametrize("args,msg", [
    (["--format", "tflite", "-o", "{tmp}/a"], "unknown --format 'tflite'"),
    (["--format", "gguf", "-o", "{native}"], "exists; pass --force"),
    (["--format", "lowbit", "-o", "{tmp}/a", "--no-vocab"], "--no-vocab is only for "
     "--format gguf"),
    (["--format", "onnx", "-o", "{tmp}/a", "--allow-requantize"], "--allow-requantize is "
     "only for --format gguf"),
])
def test_export_bad_input(native, tmp_path, args, msg):
    args = [a.format(tmp=tmp_path, native=native) for a in args]
    rc, o, e = run("export", str(native), *args)
    assert rc == 2 and msg in e and len(e.strip().splitlines()) == 1, e
    assert not (tmp_path / "a").exists()


def test_export_missing_checkpoint(tmp_path):
    rc, o, e = run("export", str(tmp_path / "nope"), "--format", "gguf", "-o", str(tmp_path / "a"))
    assert rc == 2 and "does not exist" in e
