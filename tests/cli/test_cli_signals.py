"""SIGTERM and SIGINT in the middle of writing a checkpoint leave no ``.out.*.tmp`` folder.

The exporter is wrapped (in the child process only) so that it writes the whole checkpoint
into the temporary folder, says so, and then waits: the signal arrives mid-write."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cli.test_cli_quantize import model_dir  # noqa: F401

_CHILD = """
import sys, time
from lowbit.export import native
_export = native.export

def slow_export(model, out_dir, **options):
    _export(model, out_dir, **options)
    print("WRITING", out_dir, flush=True)
    time.sleep(120)

native.export = slow_export
from lowbit.cli import main
sys.argv = ["lowbit", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 128 + signal.SIGTERM),
                                    (signal.SIGINT, 130)])
def test_signal_during_quantize_removes_the_temporary_folder(model_dir, tmp_path,  # noqa: F811
                                                             sig, rc):
    d, _ = model_dir
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", _CHILD, "quantize", str(d), "-r",
                          "int8-weight-only", "-o", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        line = ""
        while "WRITING" not in line:
            line = p.stdout.readline()
            assert line or p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the child never reached the export"
        tmp = line.split(maxsplit=1)[1].strip()
        assert tmp.endswith(".tmp") and os.path.isdir(tmp) and os.listdir(tmp)
        p.send_signal(sig)
        assert p.wait(timeout=60) == rc, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not os.path.exists(tmp)
    assert sorted(os.listdir(tmp_path)) == []  # neither the output nor a .out.*.tmp folder
