"""lowbit's native CPU helper (``lowbit.runtime.native``): the int4 packed-weight
dequantization behind int4 weight-only prefill, checked against torch's own int4 kernel and
the reference dequantization; its fallback when switched off."""

import shutil

import pytest
import torch

from lowbit.core import QuantSpec, dequantize, quantize
from lowbit.errors import ConfigError
from lowbit.hardware import hardware_path_report, reset_hardware_paths
from lowbit.runtime import PackedLinear, native
from lowbit.runtime.kernels import INT4_GEMM_ROWS, INT4_GEMV_PATH, INT4_PREFILL_PATH

HAVE_CC = shutil.which("cc") is not None


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    native.reset()
    reset_hardware_paths()
    yield
    native.reset()
    reset_hardware_paths()


def spec(group, symmetric):
    return QuantSpec(format="int4", granularity="group", group_size=group, symmetric=symmetric)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("n,k,group,symmetric", [(128, 64, 32, True), (192, 256, 64, False),
                                                 (64, 512, 128, True), (320, 512, 256, False)])
def test_dequant_equals_reference_rounded_to_bf16(n, k, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(n, k) * torch.rand(n, 1)
    qt = quantize(w, spec(group, symmetric))
    m = PackedLinear.from_qtensor(qt, None, torch.bfloat16, "int4_weight_only")
    wt = native.dequant_int4pack_t(m.w_packed, m.scale_zeros, n, k, group)
    assert wt.shape == (k, n) and wt.dtype == torch.bfloat16
    # the reference in float32 from bfloat16 scales (the int4 kernel's table), one rounding
    s = m.scale_zeros.float()  # [G, n, 2]
    q_u = (qt.element_format.code_to_int(qt.codes) + 8).float().reshape(n, k // group, group)
    ref = ((q_u - 8) * s[..., 0].t()[..., None] + s[..., 1].t()[..., None]).reshape(n, k)
    err = (wt.float().t() - ref).abs()
    assert float((err / ref.abs().clamp_min(1e-6)).max()) <= 2 ** -8
    # and close to lowbit's own dequantization (scales in float32 there)
    d = dequantize(qt).float()
    assert float((wt.float().t() - d).abs().max()) <= 0.02 * float(d.abs().max())


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_prefill_rows_take_the_gemm_and_match_torch_kernel():
    torch.manual_seed(0)
    n, k, g = 256, 192, 64
    qt = quantize(torch.randn(n, k), spec(g, False))
    m = PackedLinear.from_qtensor(qt, None, torch.bfloat16)
    assert m.kernel == "int4_weight_only" and m.prefill_gemm
    x = torch.randn(64, k, dtype=torch.bfloat16)
    with torch.no_grad():
        got = m(x).float()
        want = torch._weight_int4pack_mm_for_cpu(x, m.w_packed, g, m.scale_zeros).float()
        few = m(x[:3]).float()  # a few rows: torch's kernel
        one = m(x[:1]).float()  # a decode row: lowbit's native GEMV
    assert hardware_path_report()[INT4_PREFILL_PATH] == "hardware"
    assert float((got - want).abs().max()) <= 2 ** -6 * float(want.abs().max())
    assert torch.equal(few, want[:3])
    if m.gemv_native:  # the C++ operators built here (tests/runtime/test_native_ops.py)
        assert hardware_path_report()[INT4_GEMV_PATH] == "hardware"
        # one bfloat16 rounding apart (float32 sums in another order)
        assert float((one - want[:1]).abs().max()) <= 2 ** -7 * float(want[:1].abs().max())
    else:
        assert torch.equal(one, want[:1])
    assert INT4_GEMM_ROWS <= 64


def test_switched_off_keeps_torch_kernel(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    torch.manual_seed(0)
    qt = quantize(torch.randn(128, 128), spec(64, True))
    m = PackedLinear.from_qtensor(qt, None, torch.bfloat16)
    assert m.kernel == "int4_weight_only" and not m.prefill_gemm
    x = torch.randn(40, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        got = m(x)
    want = torch._weight_int4pack_mm_for_cpu(x, m.w_packed, 64, m.scale_zeros)
    assert torch.equal(got, want)
    assert "LOWBIT_NATIVE=0" in hardware_path_report()[INT4_PREFILL_PATH]
    with pytest.raises(native.NativeUnavailable, match="LOWBIT_NATIVE=0"):
        native.library()


def test_no_compiler_falls_back_loudly(monkeypatch):
    from lowbit.hardware import HardwareFallbackWarning
    monkeypatch.setenv("CC", "no-such-compiler-lowbit")
    qt = quantize(torch.randn(128, 128), spec(64, True))
    with pytest.warns(HardwareFallbackWarning, match="no C compiler"):
        m = PackedLinear.from_qtensor(qt, None, torch.bfloat16)
    assert not m.prefill_gemm
    assert hardware_path_report()[INT4_PREFILL_PATH].startswith("fallback: torch's int4")


def test_bad_tables_are_refused():
    if not HAVE_CC:
        pytest.skip("no C compiler")
    p = torch.zeros(128, 32, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="scale_zeros"):
        native.dequant_int4pack_t(p, torch.zeros(2, 128, 2), 128, 64, 32)


def test_float32_model_keeps_torch_kernel():
    qt = quantize(torch.randn(128, 128), spec(64, True))
    m = PackedLinear.from_qtensor(qt, None, torch.float32, act_dtype=torch.float32)
    assert m.kernel == "int4_weight_only" and not m.prefill_gemm
    assert "bfloat16 only" in hardware_path_report()[INT4_PREFILL_PATH]
