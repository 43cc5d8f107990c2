"""A script in bench/ runs with bench/ as ``sys.path[0]``: a file named like an installed
module would shadow it in every bench script (bench/gguf.py once hid the ``gguf`` package, so
transformers could not read a GGUF file from a bench run)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_no_bench_script_shadows_a_module(monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if Path(p or ".").resolve() not in (BENCH, Path.cwd())])
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    assert "rotations" in names
    shadowing = [n for n in names if n in sys.modules or importlib.util.find_spec(n)]
    assert not shadowing, f"bench scripts named like importable modules: {shadowing}"
