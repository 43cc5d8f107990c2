"""GPU kernels against the reference path (skipped without CUDA). Each test fails when its
hardware kernel was not the path taken (lowbit.hardware records it). All passed on an NVIDIA
H200 with torch 2.11.0+cu130 on 2026-12-04."""

import copy

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.core import QuantSpec, quantize
from lowbit.hardware import hardware_path_report, reset_hardware_paths
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.runtime import PackedLinear
from tests.tiny_models import build, calib_ids, loop_over

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_record():
    reset_hardware_paths()


def took(kernel):
    """The layers built so far ran ``kernel``'s hardware path, with no fallback."""
    report = hardware_path_report()
    assert report.get(f"runtime.{kernel}") == "hardware", report
    return True


def capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def need(cap):
    if capability() < cap:
        pytest.skip(f"needs compute capability {cap[0]}.{cap[1]}")


def rel_err(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max())


def weight(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)


def act_quantizer(spec: QuantSpec, x: torch.Tensor) -> TensorQuantizer:
    q = TensorQuantizer(spec, "input", "test.input_quantizer")
    if not spec.dynamic:
        q.set_amax(x.abs().amax().float().cpu())
    return q.to(CUDA)


def pair(w_spec, i_spec, x, out=128, inp=256, bias=True, dtype=torch.float32):
    """(fast layer, reference layer) on CUDA for the same weight and input quantizer."""
    w = weight(out, inp).to(CUDA)
    b = torch.randn(out, device=CUDA) if bias else None
    qt = quantize(w, w_spec)
    iq = None if i_spec is None else act_quantizer(i_spec, x)
    fast = PackedLinear.from_qtensor(qt, b, dtype, input_quantizer=iq, device=CUDA)
    ref = PackedLinear.from_qtensor(qt, b, dtype, "reference", iq, device=CUDA)
    return fast, ref


@pytest.mark.parametrize("m", [1, 33])
def test_fp8_scaled_mm_tensorwise(m):
    need((8, 9))
    x = torch.randn(m, 256, device=CUDA)
    fast, ref = pair(QuantSpec(format="fp8_e4m3"), QuantSpec(format="fp8_e4m3"), x)
    assert fast.kernel == "fp8_scaled_mm" and not fast.rowwise and took("fp8_scaled_mm")
    assert fast.w_fp8.dtype == torch.float8_e4m3fn and fast.w_fp8.is_contiguous()
    with torch.no_grad():
        assert rel_err(ref(x), fast(x)) < 1e-2


@pytest.mark.parametrize("m", [1, 33])
def test_fp8_scaled_mm_rowwise(m):
    need((9, 0))
    x = torch.randn(m, 256, device=CUDA, dtype=torch.bfloat16)
    fast, ref = pair(QuantSpec(format="fp8_e4m3", granularity="channel"),
                     QuantSpec(format="fp8_e4m3", granularity="token", dynamic=True), x,
                     dtype=torch.bfloat16)
    assert fast.kernel == "fp8_scaled_mm" and fast.rowwise and took("fp8_scaled_mm")
    with torch.no_grad():
        y = fast(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 128)
        assert rel_err(ref(x), y) < 2e-2


def test_fp8_odd_dims_fall_back():
    need((8, 9))
    x = torch.randn(4, 200, device=CUDA)
    fast, _ = pair(QuantSpec(format="fp8_e4m3"), QuantSpec(format="fp8_e4m3"), x, inp=200)
    assert fast.kernel == "reference"


@pytest.mark.parametrize("m", [1, 17, 40])
def test_int8_int_mm_cuda(m):
    x = torch.randn(m, 256, device=CUDA)
    fast, ref = pair(QuantSpec(format="int8", granularity="channel"),
                     QuantSpec(format="int8", granularity="token", dynamic=True), x)
    assert fast.kernel == "w8a8_int8" and took("w8a8_int8")
    with torch.no_grad():
        assert rel_err(ref(x), fast(x)) < 1e-4


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, False), (128, True)])
def test_int4_tinygemm(group, symmetric):
    need((8, 0))
    x = torch.randn(3, 256, device=CUDA, dtype=torch.bfloat16)
    spec = QuantSpec(format="int4", granularity="group", group_size=group, symmetric=symmetric)
    fast, ref = pair(spec, None, x, dtype=torch.bfloat16)
    assert fast.kernel == "int4_weight_only_cuda" and took("int4_weight_only_cuda")
    assert fast.w_packed.numel() * fast.w_packed.element_size() == 128 * 256 // 2
    with torch.no_grad():
        assert rel_err(ref(x), fast(x)) < 2e-2
        x1 = x[:1]
        assert rel_err(ref(x1), fast(x1)) < 2e-2  # GEMV


def test_reference_on_cuda_equals_cpu():
    for fmt in ("nvfp4", "mxfp4", "int4", "fp8_e4m3"):
        spec = QuantSpec(format=fmt, granularity="group", group_size=32) if fmt == "int4" \
            else QuantSpec(format=fmt)
        qt = quantize(weight(64, 128), spec)
        cpu = PackedLinear.from_qtensor(qt, kernel="reference")
        gpu = PackedLinear.from_qtensor(qt, kernel="reference", device=CUDA)
        assert torch.equal(cpu.dequantized_weight(), gpu.dequantized_weight().cpu()), fmt


@pytest.mark.parametrize("recipe,kernel,cap", [
    ("int4-weight-only", "int4_weight_only_cuda", (8, 0)),
    ("int8-dynamic", "w8a8_int8", (7, 5)),
    ("fp8", "fp8_scaled_mm", (8, 9)),
    ("fp8-dynamic", "fp8_scaled_mm", (9, 0)),
    ("nvfp4", "reference", (0, 0))])
def test_convert_model_on_cuda(recipe, kernel, cap):
    need(cap)
    ids = calib_ids(2, 16)
    m = build("llama")
    kw = {"group_size": 32} if recipe.startswith("int4") else {}
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(4, 32)), **kw)
    with torch.no_grad():
        a = m(ids).logits
        # the error bfloat16 alone makes: the fake-quantized model itself run in bf16 on CUDA
        bf16 = copy.deepcopy(m).to(CUDA, torch.bfloat16)
        floor = rel_err(a, bf16(ids.to(CUDA)).logits.cpu())
        m.to(CUDA)
        assert rt.convert(m) == {kernel: 14}
        assert kernel == "reference" or took(kernel)
        b = m(ids.to(CUDA)).logits.cpu()
    err = rel_err(a, b)
    print(f"{recipe}: {kernel} vs FP32 CPU {err:.4f}, bf16 fake-quant vs FP32 CPU {floor:.4f}")
    # the bf16 kernels may not lose more than the bf16 model does (x1.5), nor more than 3%
    assert err < max(3e-2, 1.5 * floor)


def test_load_packed_on_cuda(tmp_path):
    need((8, 0))
    m = build("llama")
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    lowbit.save(m, tmp_path / "ckpt")
    p = lowbit.load(tmp_path / "ckpt", device="cuda", packed=True)
    kernels = {x.kernel for x in p.modules() if isinstance(x, PackedLinear)}
    assert kernels == {"int4_weight_only_cuda"} and took("int4_weight_only_cuda")
    ids = calib_ids(2, 16)
    with torch.no_grad():
        assert rel_err(m(ids).logits, p(ids.to(CUDA)).logits.cpu()) < 3e-2
