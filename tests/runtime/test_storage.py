"""Packed storage: resident bytes equal the packed size, and dequantizing it equals the
fake-quantized weight bit for bit, for every format."""

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit import formats
from lowbit.core import QuantSpec, dequantize, fake_quant, quantize
from lowbit.runtime import PackedLinear
from lowbit.runtime.storage import (dequantize_packed, pack_weight, packed_nbytes,
                                    unpack_codes)

SPECS = {
    "int8_channel": dict(format="int8", granularity="channel"),
    "int8_g32_fp16": dict(format="int8", granularity="group", group_size=32,
                          scale_format="fp16"),
    "int4_g32": dict(format="int4", granularity="group", group_size=32),
    "int4_g32_asym": dict(format="int4", granularity="group", group_size=32,
                          symmetric=False),
    "int4_g48_bf16": dict(format="int4", granularity="group", group_size=48,
                          scale_format="bf16"),
    "int3_channel": dict(format="int3", granularity="channel"),
    "int2_g16_asym": dict(format="int2", granularity="group", group_size=16,
                          symmetric=False),
    "uint8_tensor_asym": dict(format="uint8", symmetric=False),
    "int8_block": dict(format="int8", granularity="block", block=(16, 32)),
    "fp8_e4m3_tensor": dict(format="fp8_e4m3"),
    "fp8_e4m3_channel": dict(format="fp8_e4m3", granularity="channel"),
    "fp8_e5m2_channel": dict(format="fp8_e5m2", granularity="channel"),
    "fp6_e3m2_g32": dict(format="fp6_e3m2", granularity="group", group_size=32),
    "nvfp4": dict(format="nvfp4"),
    "mxfp4": dict(format="mxfp4"),
    "mxfp6_e2m3": dict(format="mxfp6_e2m3"),
    "mxfp8_e4m3": dict(format="mxfp8_e4m3"),
}
CODE_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn,
               "fp8_e5m2": torch.float8_e5m2, "mxfp8_e4m3": torch.float8_e4m3fn}


def weight(out=48, inp=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 3


@pytest.mark.parametrize("name", list(SPECS))
def test_storage_bytes_equal_packed_size(name):
    spec = QuantSpec(**SPECS[name])
    qt = quantize(weight(), spec)
    bufs = pack_weight(qt)
    resident = sum(t.numel() * t.element_size() for t in bufs.values() if t is not None)
    assert resident == packed_nbytes(spec, qt.shape) == qt.nbytes()
    fmt = spec.format
    assert bufs["codes"].dtype == CODE_DTYPES.get(fmt, torch.uint8)
    if spec.bits < 8:
        assert bufs["codes"].shape == (48, formats.packed_size(96, spec.bits))
    scale_dt = {"e4m3": torch.float8_e4m3fn, "e8m0": torch.float8_e8m0fnu,
                "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    assert bufs["scale"].dtype == scale_dt[spec.scale_format]


@pytest.mark.parametrize("name", list(SPECS))
def test_dequantize_packed_is_bit_exact(name):
    spec = QuantSpec(**SPECS[name])
    w = weight(seed=1)
    qt = quantize(w, spec)
    bufs = pack_weight(qt)
    ref = fake_quant(w, spec)
    assert torch.equal(dequantize(qt), ref)
    for device_path in (False, True):
        got = dequantize_packed(bufs, spec, qt.shape, torch.float32, device_path)
        assert torch.equal(got, ref), device_path


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 32, 33])
def test_unpack_codes_equals_formats_unpack(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (3, n), generator=g).to(torch.uint8)
    packed = formats.pack(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert torch.equal(unpack_codes(packed, bits, n), formats.unpack(packed, bits, n))


@pytest.mark.parametrize("name", ["int8_channel", "int4_g32", "int4_g32_asym",
                                  "fp8_e4m3_channel", "nvfp4", "mxfp4", "int3_channel"])
def test_reference_layer_equals_fake_quant(name):
    spec = QuantSpec(**SPECS[name])
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48)
    x = torch.randn(5, 96)
    with torch.no_grad():
        y_fake = torch.nn.functional.linear(x, fake_quant(lin.weight, spec), lin.bias)
        layer = PackedLinear.from_qtensor(quantize(lin.weight, spec), lin.bias,
                                          kernel="reference")
        assert torch.equal(layer(x), y_fake)
        assert torch.equal(layer.dequantized_weight(), fake_quant(lin.weight, spec))
    assert layer.resident_nbytes() == layer.packed_nbytes
    assert not any(b.is_floating_point() and b.dtype in (torch.float32, torch.bfloat16) and
                   b.numel() >= 48 * 96 for b in layer.buffers())


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4", "mxfp4", "int4-weight-only-asym",
                                    "gguf-q8_0"])
def test_model_reference_memory_equals_packed(recipe):
    from tests.tiny_models import build, calib_ids, loop_over

    m = build("llama")
    kw = {"group_size": 32} if recipe.startswith("int4") else {}
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(2, 16)), **kw)
    from lowbit.export import quantized_modules, weight_qtensor

    expected = sum(weight_qtensor(q).nbytes() for _, q in quantized_modules(m))
    rt.convert(m, fast=False)
    rep = rt.memory_report(m)
    assert rep["resident"] == rep["packed"] and rep["ratio"] == 1.0
    ref = rep["kernels"]["reference"]
    assert ref["layers"] == 14 and ref["resident"] == ref["packed"] == expected
