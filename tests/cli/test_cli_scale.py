"""`lowbit quantize --auto`, `--stream` and under torchrun, as a user runs them."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.cli.test_cli_quantize import model_dir, run  # noqa: F401  (fixture)


def _load_logits(path, ids):
    import lowbit

    m = lowbit.load(path)
    with torch.no_grad():
        return m(ids).logits


def test_auto_writes_mix_and_recipe(model_dir, tmp_path):  # noqa: F811
    d, text = model_dir
    out = tmp_path / "auto"
    rc, o, e = run("quantize", str(d), "--auto", "6", "--candidates",
                   "bf16,int8-weight-only,int4-weight-only", "--calib", str(text),
                   "--samples", "4", "--seq-len", "32", "--group-size", "16", "-o", str(out))
    assert rc == 0, e
    assert "auto:" in o and "bits per weight" in o
    from lowbit import recipes

    rec = recipes.load(out / "auto_recipe.yaml")
    assert rec.name == "auto-6" and rec.targets
    from lowbit.eval.footprint import weight_footprint
    import lowbit

    m = lowbit.load(out)
    names = {n for n, mod in m.named_modules() if hasattr(mod, "weight_quantizer")}
    assert names, "nothing was quantized"
    # the budget holds over the searched layers (16 bits counted for the unquantized ones)
    assert weight_footprint(m)["bits_per_weight"] < 32


def test_stream_matches_in_memory(model_dir, tmp_path):  # noqa: F811
    d, text = model_dir
    common = ["-r", "int4-weight-only", "--group-size", "16"]
    rc, o, e = run("quantize", str(d), *common, "-o", str(tmp_path / "mem"))
    assert rc == 0, e
    rc, o, e = run("quantize", str(d), *common, "--stream", "-o", str(tmp_path / "st"))
    assert rc == 0, e
    assert "source size" in o and "output weights" in o
    ids = torch.randint(0, 28, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_load_logits(tmp_path / "st", ids),
                               _load_logits(tmp_path / "mem", ids), rtol=0, atol=0)


def test_stream_with_calibration(model_dir, tmp_path):  # noqa: F811
    d, text = model_dir
    out = tmp_path / "g"
    rc, o, e = run("quantize", str(d), "-r", "int4-gptq", "--group-size", "16", "--calib",
                   str(text), "--samples", "4", "--seq-len", "32", "--stream", "-o", str(out))
    assert rc == 0, e
    ids = torch.randint(0, 28, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(_load_logits(out, ids)).all()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("args,msg", [
    (["-o", "{tmp}/a"], "either --recipe"),
    (["-r", "int8", "--auto", "5", "-o", "{tmp}/a"], "either --recipe"),
    (["--auto", "5", "-o", "{tmp}/a"], "needs --calib"),
    (["-r", "int4-weight-only", "--stream", "--format", "gguf", "-o", "{tmp}/a"],
     "--stream writes the lowbit format"),
    (["--auto", "5", "--calib", "{text}", "--stream", "-o", "{tmp}/a"], "--stream runs one"),
    (["--auto", "1", "--calib", "{text}", "--samples", "2", "--seq-len", "16",
      "--candidates", "bf16,int8-weight-only", "-o", "{tmp}/a"], "cannot be met"),
])
def test_bad_input(model_dir, tmp_path, args, msg):  # noqa: F811
    d, text = model_dir
    args = [a.format(tmp=tmp_path, text=text) for a in args]
    rc, o, e = run("quantize", str(d), *args)
    assert rc == 2, (o, e)
    assert msg in e and len(e.strip().splitlines()) == 1, e
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed")
def test_torchrun_two_processes_equal_one(model_dir, tmp_path):  # noqa: F811
    """Data-parallel calibration: 2 ranks, each on half the windows, give what 1 process
    gives on all of them (static int8 amax: a max, all-reduced)."""
    d, text = model_dir
    args = ["quantize", str(d), "-r", "int8", "--calib", str(text), "--samples", "4",
            "--seq-len", "32", "--chunk-size", "2"]
    rc, o, e = run(*args, "-o", str(tmp_path / "one"))
    assert rc == 0, e
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m",
                        "lowbit", *args, "-o", str(tmp_path / "two")], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "processes" in p.stdout
    ids = torch.randint(0, 28, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_load_logits(tmp_path / "two", ids),
                               _load_logits(tmp_path / "one", ids), rtol=1e-6, atol=1e-6)
