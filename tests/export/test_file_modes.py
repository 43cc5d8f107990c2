"""Saved checkpoints get the modes the user's umask gives (0755 folders, 0644 files under 022),
not mkdtemp's 0700, so a server running as another user can read them."""

import importlib.util
import os
import stat

import pytest
import torch
from torch import nn

import lowbit
from tests.tiny_models import build

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))


@pytest.fixture
def umask():
    old = os.umask(0o022)

    def set_(mask):
        os.umask(mask)
    yield set_
    os.umask(old)


def _modes(root):
    """``{relative path: permission bits}`` of ``root`` and everything under it."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


@pytest.fixture(scope="module")
def llama():
    m = build("llama")
    lowbit.quantize(m, "gguf-q8_0")  # int8 groups of 32: exact in every format below
    return m


@pytest.mark.parametrize("mask", [0o022, 0o027])
@pytest.mark.parametrize("fmt,options", [
    ("lowbit", {}), ("compressed-tensors", {}), ("gguf", {"tokenizer": None})])
def test_export_modes_follow_the_umask(llama, tmp_path, umask, mask, fmt, options):
    umask(mask)
    out = lowbit.save(llama, tmp_path / "sub" / "out", format=fmt, **options)
    modes = _modes(out)
    assert len(modes) > 1
    for name, mode in modes.items():
        is_dir = (out / name).is_dir()
        want = (0o777 if is_dir else 0o666) & ~mask
        assert mode == want, f"{fmt}: {name} has mode {oct(mode)}, want {oct(want)}"
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o777 & ~mask
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx and onnxscript")
def test_onnx_modes(tmp_path, umask):
    umask(0o022)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    lowbit.quantize(model, {"name": "t", "targets": [
        {"pattern": "*", "weight": {"format": "int8", "granularity": "channel"}}]})
    out = lowbit.save(model, tmp_path / "o", format="onnx", example_inputs=(torch.randn(2, 16),))
    modes = _modes(out)
    assert modes["."] == 0o755 and "model.onnx" in modes
    assert all(m == 0o644 for n, m in modes.items() if n != "."), modes


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_recipe_has_the_umask_mode(tmp_path, umask, mask):
    """``recipes.save`` (also ``quantize --auto``'s auto_recipe.yaml) writes through mkstemp."""
    from lowbit import recipes

    umask(mask)
    p = recipes.save(recipes.load("int8"), tmp_path / "r.yaml")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert recipes.load(p).to_dict() == recipes.load("int8").to_dict()
    assert [f.name for f in tmp_path.iterdir()] == ["r.yaml"]
