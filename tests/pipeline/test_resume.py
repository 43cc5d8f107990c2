"""Resuming a streamed quantization after ``kill -9``: the same call continues from the last
finished block and the result is bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from lowbit.errors import CheckpointError
from lowbit.pipeline import quantize_checkpoint
from tests.pipeline.test_stream import assert_same_checkpoint, save_src, tiny
from tests.tiny_models import calib_ids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET, OPTS = "int4-gptq", {"group_size": 32, "chunk_size": 4}

# the run a user would start (and start again): the same arguments every time
SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from lowbit.pipeline import quantize_checkpoint
    from tests.tiny_models import calib_ids
    src, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    quantize_checkpoint(src, "int4-gptq", calib_ids(6, 16), out, group_size=32, chunk_size=4,
                        progress=lambda i, n, name: time.sleep(pause))
""")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_script(src, out, pause=0.0, kill_at=None, wait=True):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    env.pop("LOWBIT_TEST_KILL_AT", None)
    if kill_at:
        env["LOWBIT_TEST_KILL_AT"] = kill_at
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, str(src), str(out), str(pause)],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        p.communicate(timeout=120)
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The source checkpoint (5 blocks) and an uninterrupted streamed run of it."""
    d = tmp_path_factory.mktemp("resume")
    src = save_src(tiny(layers=5), d / "src", max_shard_size="80KB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_checkpoint(src, PRESET, calib_ids(6, 16), d / "ref", **OPTS)
    return src, d / "ref"


def manifest(out):
    return json.loads((out.parent / f".{out.name}.partial" / "manifest.json").read_text())


@pytest.mark.parametrize("kill_at,resume_at", [("done:1", 2), ("exported:2", 2),
                                               ("done:4", 5)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, kill_at, resume_at):
    """Killed after block 1 was recorded, after block 2's files were written but before the
    manifest said so, or after the last block (before the output was assembled)."""
    src, ref = reference
    out = tmp_path / "out"
    p = run_script(src, out, kill_at=kill_at)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing half-written
    assert manifest(out)["done"] == resume_at
    r = quantize_checkpoint(src, PRESET, calib_ids(6, 16), out, **OPTS)  # the same call
    assert r.resumed_from == resume_at
    assert [b["block"] for b in r.blocks] == [f"model.layers.{i}" for i in range(5)]
    assert_same_checkpoint(out, ref)
    assert not (tmp_path / ".out.partial").exists()


def test_external_kill_while_running(tmp_path, reference):
    """kill -9 from outside as soon as the manifest shows a finished block; the command run
    again finishes the job."""
    src, ref = reference
    out = tmp_path / "out"
    p = run_script(src, out, pause=0.5, wait=False)
    mf = tmp_path / ".out.partial" / "manifest.json"
    t0 = time.time()
    while time.time() - t0 < 60:
        if mf.is_file() and json.loads(mf.read_text())["done"] >= 1:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    done = manifest(out)["done"]
    assert 1 <= done < 5
    p = run_script(src, out)
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    assert_same_checkpoint(out, ref)


def test_changed_job_is_refused_or_restarted(tmp_path, reference):
    src, ref = reference
    out = tmp_path / "out"
    assert run_script(src, out, kill_at="done:1").returncode == -signal.SIGKILL
    with pytest.raises(CheckpointError, match="unfinished run with other calib"):
        quantize_checkpoint(src, PRESET, calib_ids(6, 16, seed=5), out, **OPTS)
    with pytest.raises(CheckpointError, match="recipe"):
        quantize_checkpoint(src, "int4-awq", calib_ids(6, 16), out, **OPTS)
    r = quantize_checkpoint(src, PRESET, calib_ids(6, 16), out, resume=False, **OPTS)
    assert r.resumed_from == 0
    assert_same_checkpoint(out, ref)
