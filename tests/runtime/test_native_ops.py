"""lowbit's torch operators (``lowbit.runtime.native``: ``torch.ops.lowbit.int4_mm``,
``bf16_mm``, ``decode_attn``) against torch's own kernels and a float32 reference, the decode
paths that take them (int4 and bfloat16 decode rows, FastDecoder's attention), and their
fallbacks. Skipped where the operators cannot be built here (no C++ compiler, a CPU without
AVX-512 BF16): the decode paths then record a fallback, tested below too."""

import shutil

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.core import QuantSpec, quantize
from lowbit.hardware import hardware_path_report, reset_hardware_paths
from lowbit.runtime import FastDecoder, PackedLinear, native
from lowbit.runtime.decode import ATTN_PATH, _one_query
from lowbit.runtime.fuse import BF16_GEMV_PATH, float_linear
from lowbit.runtime.kernels import INT4_GEMV_PATH


def _ops_ok() -> str | None:
    if shutil.which("c++") is None:
        return "no C++ compiler"
    try:
        native.int4_gemv_ready()
        native.bf16_gemv_ready()
        native.decode_attn_ready()
    except native.NativeUnavailable as e:
        return str(e)
    return None


WHY = _ops_ok()
needs_ops = pytest.mark.skipif(WHY is not None, reason=f"native operators unavailable: {WHY}")


@pytest.fixture(autouse=True)
def fresh():
    native.reset()
    reset_hardware_paths()
    yield
    native.reset()
    reset_hardware_paths()


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@needs_ops
@pytest.mark.parametrize("n,k,group,symmetric", [(64, 64, 32, True), (192, 576, 64, False),
                                                 (640, 1536, 128, True), (128, 512, 256, False),
                                                 (3072, 576, 64, True)])
def test_int4_gemv_matches_torch_kernel(n, k, group, symmetric):
    torch.manual_seed(0)
    qt = quantize(torch.randn(n, k), QuantSpec(format="int4", granularity="group",
                                               group_size=group, symmetric=symmetric))
    m = PackedLinear.from_qtensor(qt, None, torch.bfloat16, "int4_weight_only")
    assert m.gemv_native
    for scale in (1.0, 30.0):  # outliers in the input as real activations have
        x = (torch.randn(1, k) * scale).to(torch.bfloat16)
        x[0, 3] = 40 * scale
        want = torch._weight_int4pack_mm_for_cpu(x, m.w_packed, group, m.scale_zeros)
        got = torch.ops.lowbit.int4_mm(x, m.w_packed, m.scale_zeros, group)
        assert got.dtype == torch.bfloat16 and got.shape == (1, n)
        assert rel(got, want) <= 2 ** -7
        with torch.no_grad():
            assert torch.equal(m(x), got)  # the layer's decode row takes it
    assert hardware_path_report()[INT4_GEMV_PATH] == "hardware"


@needs_ops
@pytest.mark.parametrize("n,k", [(1, 16), (7, 50), (64, 576), (33, 1536), (600, 96)])
def test_bf16_gemv_matches_mv(n, k):
    torch.manual_seed(0)
    w = torch.randn(n, k).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16)
    want = torch.mv(w, x[0])
    got = torch.ops.lowbit.bf16_mm(x, w)[0]
    assert rel(got, want) <= 2 ** -7
    assert torch.equal(float_linear(x, w, b), (got + b)[None])
    assert hardware_path_report()[BF16_GEMV_PATH] == "hardware"
    # float16 and float32 rows keep torch's paths
    assert torch.equal(float_linear(x.half(), w.half()), torch.mv(w.half(), x[0].half())[None])


@needs_ops
@pytest.mark.parametrize("h,nkv,d,pos", [(9, 3, 64, 0), (9, 3, 64, 200), (8, 8, 128, 31),
                                         (4, 1, 32, 77), (16, 4, 256, 5)])
def test_decode_attention_matches_float_attention(h, nkv, d, pos):
    torch.manual_seed(0)
    cache = 256
    q = torch.randn(h, d).to(torch.bfloat16)
    k, v = (torch.randn(nkv, cache, d).to(torch.bfloat16) for _ in range(2))
    k[:, pos + 1:] = v[:, pos + 1:] = float("nan")  # beyond the filled part: never read
    want = _one_query(q[None, :, None], k[None, :, :pos + 1], v[None, :, :pos + 1], nkv)
    got = torch.ops.lowbit.decode_attn(q, k, v, torch.tensor([pos]), d ** -0.5)
    assert got.shape == (h, d) and got.dtype == torch.bfloat16
    assert rel(got, want[0, :, 0]) <= 2 ** -7


@needs_ops
def test_operators_refuse_bad_operands():
    x = torch.randn(1, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.lowbit.bf16_mm(x.float(), torch.randn(8, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="scale_zeros"):
        torch.ops.lowbit.int4_mm(x, torch.zeros(64 * 32, dtype=torch.uint8),
                                 torch.zeros(2, 64, 2), 32)
    q = torch.randn(4, 64).to(torch.bfloat16)
    kv = torch.randn(2, 8, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.lowbit.decode_attn(q, kv, kv, torch.tensor([8]), 0.125)


@needs_ops
@pytest.mark.parametrize("compile", [False, True])
def test_fast_decoder_bf16_takes_the_native_paths(compile):
    """An int4 model in bfloat16 (tied float head): every decode path is native, the step
    logits stay within bfloat16 rounding of the same decoder on torch's ops, and the greedy
    tokens agree until a near-tie."""
    import transformers as tf
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(  # projections multiples of 64: native int4 rows
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32)).eval()
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    rt.convert(m)
    m = m.to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        dec = FastDecoder(m, compile=compile)
        assert dec._attn_native
        out = dec.generate(ids, 8)
        ref_dec = FastDecoder(m)
        ref_dec._attn_native = False
        a, b = dec.forward(ids[0], 0), ref_dec.forward(ids[0], 0)
        assert rel(a, b) <= 2 ** -5
        for i in range(4):
            t = out[0, 9 + i:10 + i]
            a, b = dec.forward(t, 9 + i), ref_dec.forward(t, 9 + i)
            assert rel(a, b) <= 2 ** -5
    rep = hardware_path_report()
    assert rep[ATTN_PATH] == rep[INT4_GEMV_PATH] == "hardware"
    assert out.shape == (1, 17)


def test_switched_off_records_and_keeps_torch(monkeypatch):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    native.reset()
    w = torch.randn(8, 64).to(torch.bfloat16)
    x = torch.randn(1, 64).to(torch.bfloat16)
    assert torch.equal(float_linear(x, w), torch.mv(w, x[0])[None])
    assert "LOWBIT_NATIVE=0" in hardware_path_report()[BF16_GEMV_PATH]
    qt = quantize(torch.randn(128, 128), QuantSpec(format="int4", granularity="group",
                                                   group_size=64, symmetric=True))
    m = PackedLinear.from_qtensor(qt, None, torch.bfloat16)
    assert not m.gemv_native
    assert "LOWBIT_NATIVE=0" in hardware_path_report()[INT4_GEMV_PATH]
    with pytest.raises(native.NativeUnavailable, match="LOWBIT_NATIVE=0"):
        native.decode_attn_ready()


def test_no_cxx_compiler_falls_back_loudly(monkeypatch):
    """Where the operator library was never loaded in this process, a missing C++ compiler
    is a recorded fallback with a warning (the library is loaded once per process, so this
    is checked on the build step itself)."""
    monkeypatch.setenv("CXX", "no-such-compiler-lowbit")
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
        native._build_ops()


@needs_ops
@pytest.mark.parametrize("n,k", [(64, 576), (40, 80), (4096, 1024)])
def test_int8_gemv_matches_torch_kernel(n, k):
    torch.manual_seed(0)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s = (torch.rand(n) * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    want = torch._weight_int8pack_mm(x, w, s)
    got = torch.ops.lowbit.int8_mm(x, w, s)
    assert got.dtype == torch.bfloat16 and rel(got, want) <= 2 ** -7


@needs_ops
def test_int8_layer_decode_row_takes_the_native_gemv():
    from lowbit.runtime.kernels import INT8_GEMV_PATH
    torch.manual_seed(0)
    qt = quantize(torch.randn(96, 256), QuantSpec(format="int8", granularity="channel"))
    m = PackedLinear.from_qtensor(qt, None, torch.bfloat16)
    assert m.kernel == "int8_weight_only" and m.gemv_native
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        one, few = m(x[:1]), m(x)
    assert torch.equal(one, torch.ops.lowbit.int8_mm(x[:1], m.w_int8, m.w_scale))
    assert torch.equal(few, torch._weight_int8pack_mm(x, m.w_int8, m.w_scale))
    assert rel(one, few[:1]) <= 2 ** -7
    assert hardware_path_report()[INT8_GEMV_PATH] == "hardware"
