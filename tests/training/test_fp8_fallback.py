"""FP8 training's hardware path: a failing ``torch._scaled_mm`` warns once, says which path
ran (lowbit.hardware), and the emulation it falls back to gives the same result."""

import warnings

import pytest
import torch
from torch import nn

import lowbit.training.fp8 as fp8
from lowbit.hardware import (HardwareFallbackWarning, hardware_path_counts,
                             hardware_path_report, reset_hardware_paths)
from lowbit.training import convert_to_fp8, fp8_autocast


@pytest.fixture(autouse=True)
def fresh_record(monkeypatch):
    monkeypatch.setattr(fp8, "_SCALED_MM_BROKEN", False)
    monkeypatch.setattr(fp8, "_SCALED_MM_ERROR", None)
    reset_hardware_paths()
    yield
    reset_hardware_paths()


def _steps(n=2):
    """``n`` training steps of an FP8 linear (32 -> 16, multiples of 16); returns the
    outputs and the gradients of input and weight of each step."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    seq = nn.Sequential(lin)
    convert_to_fp8(seq, amax_history_len=4)
    seq.train()
    out = []
    for i in range(n):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(i), requires_grad=True)
        with fp8_autocast(seq):
            y = seq(x)
        y.square().sum().backward()
        out.append((y.detach(), x.grad, lin.weight.grad.clone()))
        lin.weight.grad = None
    return out


def test_cpu_emulation_is_the_designed_path_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", HardwareFallbackWarning)
        _steps(1)
    assert hardware_path_report()[fp8.PATH] == "fallback: inputs on cpu"


def test_failing_scaled_mm_warns_once_and_equals_the_emulation(monkeypatch):
    ref = _steps()
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("_scaled_mm: this GPU has no FP8 tensor cores")

    # pretend the tensors are on a GPU, whose _scaled_mm refuses
    monkeypatch.setattr(fp8, "_on_gpu", lambda t: True)
    monkeypatch.setattr(torch, "_scaled_mm", broken, raising=False)
    with pytest.warns(HardwareFallbackWarning) as rec:
        got = _steps()
    msgs = [str(w.message) for w in rec if issubclass(w.category, HardwareFallbackWarning)]
    assert len(msgs) == 1, msgs
    assert "training.fp8_scaled_mm" in msgs[0] and "no FP8 tensor cores" in msgs[0]
    assert "float32 emulation" in msgs[0]
    assert len(calls) == 1  # tried once, then the emulation for the rest of the process
    report = hardware_path_report()[fp8.PATH]
    assert report.startswith("fallback: the float32 emulation") and "RuntimeError" in report
    assert sum(hardware_path_counts()[fp8.PATH].values()) >= 6  # 3 GEMMs x 2 steps
    for (y0, gx0, gw0), (y1, gx1, gw1) in zip(ref, got):  # FP8 codes dequantized = emulation
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1)


def test_out_of_memory_is_raised_not_hidden(monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fp8, "_on_gpu", lambda t: True)
    monkeypatch.setattr(torch, "_scaled_mm", oom, raising=False)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _steps(1)
    assert not fp8._SCALED_MM_BROKEN


def test_working_scaled_mm_is_recorded_as_hardware(monkeypatch):
    """The bookkeeping of the hardware path, with a stand-in ``_scaled_mm`` on the CPU that
    multiplies the dequantized operands (the GPU test checks the real one)."""
    def fake(a, b, scale_a, scale_b, out_dtype):
        return (a.float() * scale_a) @ (b.float() * scale_b)

    ref = _steps(1)
    reset_hardware_paths()
    monkeypatch.setattr(fp8, "_on_gpu", lambda t: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HardwareFallbackWarning)
        got = _steps(1)
    assert hardware_path_report() == {fp8.PATH: "hardware"}
    assert hardware_path_counts()[fp8.PATH] == {"hardware": 3}
    torch.testing.assert_close(got[0][0], ref[0][0], rtol=1e-5, atol=1e-5)
