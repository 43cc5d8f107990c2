"""The version floors pyproject.toml declares are the ones constraints-oldest.txt pins, and
under ``make test-oldest`` (LOWBIT_OLDEST set) the installed versions are those pins."""

import importlib.metadata
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORED = ["torch", "transformers", "compressed-tensors", "gguf", "onnx", "onnxscript",
           "onnxruntime"]


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"{path.name}: {line!r} is not name==version"
            out[name.strip().lower()] = ver.strip()
    return out


def declared_floors() -> dict[str, set[str]]:
    """``name -> {floor, ...}`` of every ``name>=floor`` requirement in pyproject.toml's
    dependencies and optional dependencies."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    out: dict[str, set[str]] = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", r.strip())
        if m:
            out.setdefault(m[1].lower(), set()).add(m[2])
    return out


def same_version(a: str, b: str) -> bool:
    """``2.7`` and ``2.7.0`` are the same release."""
    def norm(v):
        parts = [int(x) for x in v.split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return parts
    return norm(a) == norm(b)


def test_pyproject_floors_are_the_oldest_pins():
    floors = declared_floors()
    pinned = pins(ROOT / "constraints-oldest.txt")
    for name in FLOORED:
        assert len(floors.get(name, ())) == 1, f"pyproject: one floor for {name}, got " \
                                               f"{floors.get(name)}"
        (floor,) = floors[name]
        assert name in pinned, f"constraints-oldest.txt has no {name}=={floor}"
        assert same_version(floor, pinned[name]), (name, floor, pinned[name])
    assert set(pinned) == set(FLOORED), "constraints-oldest.txt pins only the floors"


@pytest.mark.skipif(not os.environ.get("LOWBIT_OLDEST"),
                    reason="runs under `make test-oldest` (LOWBIT_OLDEST names its pins)")
def test_installed_versions_are_the_pins():
    for name, ver in pins(Path(os.environ["LOWBIT_OLDEST"])).items():
        got = importlib.metadata.version(name).split("+")[0]
        assert got == ver, f"{name}: installed {got}, pinned {ver}"
