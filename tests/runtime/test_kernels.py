"""Kernel logic checked on the CPU: selection rules, and the FP8 ``_scaled_mm`` kernel's
layouts and scales (torch runs ``_scaled_mm`` on the CPU too, slowly), forced past its
CUDA-only selection."""

import pytest
import torch

import lowbit.runtime as rt
from lowbit.core import QuantSpec, quantize
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.runtime import LayerInfo, PackedLinear

CPU = torch.device("cpu")
FP8_T = QuantSpec(format="fp8_e4m3")
FP8_CH = QuantSpec(format="fp8_e4m3", granularity="channel")
FP8_TOK = QuantSpec(format="fp8_e4m3", granularity="token", dynamic=True)


def input_quantizer(spec, x):
    q = TensorQuantizer(spec, "input", "t.input_quantizer")
    if not spec.dynamic:
        q.set_amax(x.abs().amax())
    return q


def forced(kernel, qt, iq, dtype=torch.float32, bias=None):
    """A PackedLinear running ``kernel`` on the CPU, whatever its device rules say."""
    info = LayerInfo(qt.spec, None if iq is None else iq.spec, iq, qt.shape[1], qt.shape[0],
                     CPU, dtype)
    m = PackedLinear(kernel, qt.shape[1], qt.shape[0], bias, dtype)
    with torch.no_grad():
        rt.get_kernel(kernel).build(m, qt, info)
    return m


@pytest.mark.parametrize("w_spec,i_spec,rowwise", [(FP8_T, FP8_T, False),
                                                   (FP8_CH, FP8_TOK, True),
                                                   (FP8_T, FP8_TOK, True),
                                                   (FP8_CH, FP8_T, True)])
@pytest.mark.parametrize("m", [1, 5])
def test_fp8_scaled_mm_logic_on_cpu(w_spec, i_spec, rowwise, m):
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.rand(48, 1)
    x = torch.randn(m, 64)
    qt = quantize(w, w_spec)
    iq = input_quantizer(i_spec, x)
    fast = forced("fp8_scaled_mm", qt, iq)
    assert fast.rowwise == rowwise
    ref = PackedLinear.from_qtensor(qt, None, torch.float32, "reference", iq)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert b.dtype == torch.float32 and b.shape == (m, 48)
    tol = 1e-2 if rowwise else 1e-5  # row-wise output is bfloat16
    assert float((a - b).abs().max() / a.abs().max()) < tol


def test_selection_rules():
    def info(w, i=None, iq=None, k=64, n=32, device="cpu"):
        return LayerInfo(w, i, iq, k, n, torch.device(device), torch.float32)

    int4 = QuantSpec(format="int4", granularity="group", group_size=32)
    assert rt.select_kernel(info(int4)) == "int4_weight_only"
    assert rt.select_kernel(info(int4), fast=False) == "reference"
    assert rt.select_kernel(info(int4, n=48)) == "reference"  # out % 32
    g48 = QuantSpec(format="int4", granularity="group", group_size=48)
    assert rt.select_kernel(info(g48, k=96)) == "reference"
    int8 = QuantSpec(format="int8", granularity="channel")
    assert rt.select_kernel(info(int8)) == "int8_weight_only"
    tok = QuantSpec(format="int8", granularity="token", dynamic=True)
    assert rt.select_kernel(info(int8, tok, TensorQuantizer(tok, "input"))) == "w8a8_int8"
    static = QuantSpec(format="int8", granularity="tensor")
    uncalibrated = TensorQuantizer(static, "input")
    assert rt.select_kernel(info(int8, static, uncalibrated)) == "reference"
    calibrated = TensorQuantizer(static, "input")
    calibrated.set_amax(torch.tensor(3.0))
    assert rt.select_kernel(info(int8, static, calibrated)) == "w8a8_int8"
    # FP8 and tinygemm are CUDA kernels: never chosen for a CPU layer
    assert rt.select_kernel(info(FP8_CH, FP8_TOK, TensorQuantizer(FP8_TOK, "input"))) == \
        "reference"
    # on a CUDA device without CUDA (capability 0.0) the fused kernels are not eligible
    assert rt.select_kernel(info(int4, device="cuda")) == "reference"


@pytest.mark.parametrize("m", [1, 7, 40])
def test_int8_weight_only_gemv_and_gemm_paths(m):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    spec = QuantSpec(format="int8", granularity="channel")
    x = torch.randn(m, 64)
    from lowbit.core import fake_quant

    with torch.no_grad():
        y_fake = torch.nn.functional.linear(x, fake_quant(lin.weight, spec), lin.bias)
        layer = PackedLinear.from_qtensor(quantize(lin.weight, spec), lin.bias)
        assert layer.kernel == "int8_weight_only"
        y = layer(x)
        exact = PackedLinear.from_qtensor(quantize(lin.weight, spec), lin.bias,
                                          act_dtype=torch.float32)(x)
    assert y.dtype == torch.float32
    assert float((y - y_fake).abs().max() / y_fake.abs().max()) < 1e-2
    assert torch.allclose(exact, y_fake, rtol=1e-5, atol=1e-5)
