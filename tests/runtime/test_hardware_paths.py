"""Packed kernels whose torch ops fail: the layer falls back to the reference kernel with one
warning per kernel, the record says so, and the outputs equal the reference conversion.
Forced on the CPU by making the kernels' torch ops raise."""

import warnings

import pytest
import torch
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.core import QuantSpec, quantize
from lowbit.hardware import (HardwareFallbackWarning, hardware_path_counts,
                             hardware_path_report, reset_hardware_paths)
from lowbit.runtime import PackedLinear, fuse_linears
from tests.tiny_models import build, calib_ids, loop_over


@pytest.fixture(autouse=True)
def fresh_record():
    reset_hardware_paths()
    yield
    reset_hardware_paths()


def _quantized(recipe, **kw):
    m = build("llama")
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(2, 16)), **kw)
    return m


def _converted(recipe, fast=True, **kw):
    m = _quantized(recipe, **kw)
    counts = rt.convert(m, fast=fast)  # bfloat16 weight-only kernels: torch's packed ops
    return m, counts


class _NoFallbackWarning(warnings.catch_warnings):
    """A HardwareFallbackWarning inside the block is an error."""

    def __enter__(self):
        out = super().__enter__()
        warnings.simplefilter("error", HardwareFallbackWarning)
        return out


def _raise(msg):
    def f(*a, **k):
        raise RuntimeError(msg)
    return f


@pytest.mark.parametrize("recipe,kernel,op,kw", [
    ("int4-weight-only", "int4_weight_only", "_weight_int4pack_mm_for_cpu", {"group_size": 32}),
    ("int8-weight-only", "int8_weight_only", "_weight_int8pack_mm", {}),
    ("int8-dynamic", "w8a8_int8", "_int_mm", {})])
def test_failing_kernel_warns_once_and_runs_the_reference(monkeypatch, recipe, kernel, op, kw):
    ids = calib_ids(2, 16)
    ref, _ = _converted(recipe, fast=False, **kw)
    with _NoFallbackWarning():  # the working kernel: no warning, recorded as hardware
        _, counts = _converted(recipe, **kw)
    assert counts == {kernel: 14}
    assert hardware_path_report()[f"runtime.{kernel}"] == "hardware"
    reset_hardware_paths()

    monkeypatch.setattr(torch, op, _raise(f"{op}: not built for this CPU"))
    with pytest.warns(HardwareFallbackWarning) as rec:
        m, counts = _converted(recipe, **kw)
    msgs = [str(w.message) for w in rec if issubclass(w.category, HardwareFallbackWarning)]
    assert len(msgs) == 1, msgs  # 14 layers failed, one warning
    assert f"runtime.{kernel}" in msgs[0] and "not built for this CPU" in msgs[0]
    assert "reference kernel" in msgs[0]
    assert counts == {"reference": 14}
    report = hardware_path_report()[f"runtime.{kernel}"]
    assert report.startswith("fallback: the reference kernel") and op in report
    assert sum(hardware_path_counts()[f"runtime.{kernel}"].values()) == 14
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)


def test_a_kernel_named_explicitly_raises(monkeypatch):
    qt = quantize(torch.randn(64, 64), QuantSpec(format="int4", granularity="group",
                                                 group_size=32))
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", _raise("no such op"))
    with pytest.raises(RuntimeError, match="no such op"):
        PackedLinear.from_qtensor(qt, kernel="int4_weight_only")
    with pytest.warns(HardwareFallbackWarning, match="no such op"):
        assert PackedLinear.from_qtensor(qt).kernel == "reference"


def test_reference_by_design_is_not_warned_about():
    qt = quantize(torch.randn(32, 64), QuantSpec(format="fp8_e4m3"))
    with _NoFallbackWarning():
        assert PackedLinear.from_qtensor(qt).kernel == "reference"  # no fp8 CPU kernel
    assert hardware_path_report() == {}
    assert rt.hardware_path_report is hardware_path_report


def test_fused_decode_mismatch_warns_and_splits(monkeypatch):
    import lowbit.runtime.fuse as dec

    torch.manual_seed(0)
    mods = [nn.Linear(16, 8), nn.Linear(16, 8)]
    with _NoFallbackWarning():
        assert fuse_linears(mods).mode == "float"
    assert hardware_path_report() == {"runtime.fused_linear": "hardware"}
    good = dec._try_fuse

    def wrong(ms):  # a fusion that computes something else
        f = good(ms)
        f.weight = f.weight * 2
        return f

    monkeypatch.setattr(dec, "_try_fuse", wrong)
    mods = [nn.Linear(16, 8), nn.Linear(16, 8)]
    with pytest.warns(HardwareFallbackWarning, match="fused float matmul differs") as rec:
        assert fuse_linears(mods).mode == "split"
        assert fuse_linears(mods).mode == "split"
    assert len([w for w in rec if issubclass(w.category, HardwareFallbackWarning)]) == 1
    report = hardware_path_report()["runtime.fused_linear"]
    assert report.startswith("fallback: one call per layer (failed: RuntimeError: the fused "
                             "float matmul differs from the separate layers by ")
