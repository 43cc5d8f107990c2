"""quantize / dequantize / fake_quant over random float32 tensors (hypothesis + torch).

Scales, error bounds, clipping ranges and block scales are recomputed here independently
(plain torch reductions, numpy, ml_dtypes) rather than through lowbit's Layout.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import formats as F
from lowbit.core import QuantSpec, dequantize, fake_quant, quantize
from lowbit.errors import ConfigError, FormatError

FAST = settings(max_examples=12, deadline=None)

# --- specs ------------------------------------------------------------------------------------

INT_SPECS = [
    QuantSpec(format="int8"),
    QuantSpec(format="int8", granularity="channel"),
    QuantSpec(format="int8", granularity="channel", axis=1),
    QuantSpec(format="int8", granularity="token", dynamic=True),
    QuantSpec(format="int4", granularity="group", group_size=16),
    QuantSpec(format="int4", granularity="group", group_size=32, sym_scale="qmax"),
    QuantSpec(format="int4", granularity="group", group_size=8, axis=0),
    QuantSpec(format="int4", granularity="channel", narrow_range=True),
    QuantSpec(format="int2", granularity="group", group_size=8),
    QuantSpec(format="int3", granularity="token", dynamic=True, sym_scale="qmax"),
    QuantSpec(format="int6", granularity="block", block=(8, 16)),
    QuantSpec(format="int8", granularity="channel", scale_format="fp16"),
    QuantSpec(format="int4", granularity="group", group_size=16, scale_format="bf16"),
    # affine
    QuantSpec(format="int8", symmetric=False),
    QuantSpec(format="uint8", symmetric=False),
    QuantSpec(format="uint8", granularity="channel", symmetric=False),
    QuantSpec(format="uint4", granularity="group", group_size=16, symmetric=False),
    QuantSpec(format="int4", granularity="group", group_size=32, symmetric=False),
    QuantSpec(format="int5", granularity="token", dynamic=True, symmetric=False),
    QuantSpec(format="uint2", granularity="channel", axis=1, symmetric=False),
    QuantSpec(format="uint3", granularity="block", block=(4, 32), symmetric=False),
]
AFFINE_SPECS = [s for s in INT_SPECS if not s.symmetric]
FLOAT_SPECS = [
    QuantSpec(format="fp8_e4m3"),
    QuantSpec(format="fp8_e4m3", granularity="channel"),
    QuantSpec(format="fp8_e4m3", granularity="token", dynamic=True),
    QuantSpec(format="fp8_e5m2"),
    QuantSpec(format="fp8_e5m2", granularity="channel"),
    QuantSpec(format="fp6_e3m2", granularity="group", group_size=32),
    QuantSpec(format="fp6_e2m3", granularity="group", group_size=32),
    QuantSpec(format="fp6_e2m3", granularity="channel", axis=1),
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=16),
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=32, scale_format="e8m0"),
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=16, scale_format="e4m3"),
    QuantSpec(format="fp8_e4m3", granularity="channel", scale_format="bf16"),
]
BLOCK_FORMAT_SPECS = [QuantSpec(format=f) for f in (
    "nvfp4", "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2")]
# 2-D tiles on shapes that are not multiples of the tile (partial edge tiles)
TILE_SPECS = [
    QuantSpec(format="fp8_e4m3", granularity="block", block=(32, 32)),
    QuantSpec(format="fp8_e5m2", granularity="block", block=(16, 8)),
    QuantSpec(format="int8", granularity="block", block=(32, 32)),
]
ALL_SPECS = INT_SPECS + FLOAT_SPECS + BLOCK_FORMAT_SPECS + TILE_SPECS
# every element format appears at least once
assert {s.element_format.name.removesuffix("_narrow") for s in ALL_SPECS} >= {
    "int2", "int3", "int4", "int5", "int6", "int8", "uint2", "uint3", "uint4", "uint8",
    "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"}


def sid(spec: QuantSpec) -> str:
    """Test id: the spec's short form plus what short() leaves out."""
    parts = [spec.short().replace(" ", "-")]
    if spec.scale_format != "fp32" and spec.block_format is None:
        parts.append(spec.scale_format)
    if spec.narrow_range:
        parts.append("narrow")
    if spec.sym_scale == "qmax" and spec.element_format.kind == "int":
        parts.append("qmax")
    return "-".join(parts)


# --- tensors ----------------------------------------------------------------------------------

KINDS = ["normal", "uniform", "outliers", "positive", "negative", "sparse", "tiny", "huge"]


def make(seed: int, shape, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "uniform":
        x = torch.rand(shape, generator=g) * 6 - 3
    elif kind == "outliers":
        x = x + (torch.rand(shape, generator=g) < 0.02) * torch.randn(shape, generator=g) * 100
    elif kind == "positive":
        x = x.abs() + 0.5
    elif kind == "negative":
        x = -x.abs() - 0.01
    elif kind == "sparse":
        x = x * (torch.rand(shape, generator=g) < 0.3)
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "huge":
        x = x * 1e4
    return x


def shapes_for(spec: QuantSpec):
    if spec.granularity == "block":
        return [(45, 70), (33, 33), (2, 40, 50), (7, 16)]
    if spec.granularity == "group" and spec.axis not in (-1, None):  # groups along axis 0
        return [(8, 96), (48, 128), (16, 32), (16, 2, 8)]
    return [(1, 64), (8, 96), (48, 128), (16, 32), (2, 16, 64)]


def tensors_for(spec: QuantSpec, kinds=KINDS, two_d=False):
    shapes = [s for s in shapes_for(spec) if len(s) == 2 or not two_d]
    return st.builds(make, st.integers(0, 2**31 - 1), st.sampled_from(shapes),
                     st.sampled_from(kinds))


# --- independent helpers (2-D, stored scale layout) -------------------------------------------


def unit_reduce(x: torch.Tensor, spec: QuantSpec, op: str) -> torch.Tensor:
    """Per scale unit of a 2-D ``x``: 'amax' (max |x|), 'max' or 'min'; stored layout."""
    v = x.abs() if op == "amax" else x
    red = (lambda t, d: t.amin(d, keepdim=True)) if op == "min" else \
        (lambda t, d: t.amax(d, keepdim=True))
    g = spec.granularity
    rows, cols = x.shape
    if g == "tensor":
        return red(v.reshape(-1), 0).reshape(())
    if g == "channel":
        return red(v, 1 - spec.axis % 2)
    if g == "token":
        return red(v, 1)
    if g == "group":
        gs = spec.group_size
        if spec.axis % 2 == 1:
            return red(v.reshape(rows, cols // gs, gs), 2).squeeze(2)
        return red(v.reshape(rows // gs, gs, cols), 1).squeeze(1)
    r, c = spec.block
    out = torch.empty(math.ceil(rows / r), math.ceil(cols / c))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = red(v[i * r:(i + 1) * r, j * c:(j + 1) * c].reshape(-1), 0)
    return out


def expand(stored: torch.Tensor, spec: QuantSpec, shape) -> torch.Tensor:
    """Broadcast a stored per-unit tensor (scale, zero-point) to every element of ``shape``."""
    stored = stored.float()
    g = spec.granularity
    if g == "tensor":
        return stored.reshape(()).expand(shape)
    if g in ("channel", "token"):
        return stored.expand(shape)
    if g == "group":
        return stored.repeat_interleave(spec.group_size, dim=spec.axis)
    r, c = spec.block
    s = stored.repeat_interleave(r, dim=-2)[..., : shape[-2], :]
    return s.repeat_interleave(c, dim=-1)[..., : shape[-1]]


def expected_int_scale(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of an integer spec from its documented definition (fp32 scales)."""
    fmt = spec.element_format
    if spec.symmetric:
        denom = fmt.qmax if spec.sym_scale == "qmax" else (fmt.qmax - fmt.qmin) / 2
        s = unit_reduce(x, spec, "amax") / denom
        zp = torch.zeros_like(s)
    else:
        hi = unit_reduce(x, spec, "max").clamp_min(0)
        lo = unit_reduce(x, spec, "min").clamp_max(0)
        s = (hi - lo) / (fmt.qmax - fmt.qmin)
        s = torch.where(s > 0, s, torch.ones_like(s))
        zp = (fmt.qmin - torch.round(lo / s)).clamp(fmt.qmin, fmt.qmax)
    return torch.where(s > 0, s, torch.ones_like(s)), zp


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


# --- integer formats: codes in range, error at most half a step inside the clipping range -----


@pytest.mark.parametrize("spec", INT_SPECS, ids=sid)
@FAST
@given(data=st.data())
def test_int_codes_in_range_and_error_at_most_half_a_step(spec, data):
    x = data.draw(tensors_for(spec, two_d=True))
    fmt = spec.element_format
    qt = quantize(x, spec)
    assert qt.codes.dtype == torch.uint8 and qt.codes.shape == x.shape
    q = fmt.code_to_int(qt.codes)
    assert int(q.min()) >= fmt.qmin and int(q.max()) <= fmt.qmax
    if spec.symmetric:
        assert qt.zero_point is None
    else:
        assert qt.zero_point.dtype == torch.int32
        assert int(qt.zero_point.min()) >= fmt.qmin and int(qt.zero_point.max()) <= fmt.qmax

    # the scale is the documented one
    s_ref, zp_ref = expected_int_scale(x, spec)
    if spec.scale_format == "fp32":
        torch.testing.assert_close(qt.scale, s_ref, rtol=2e-7, atol=0)
        if not spec.symmetric:
            assert torch.equal(qt.zero_point.float(), zp_ref)
    else:  # fp16 / bf16 storage: the fp32 scale rounded to it
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[spec.scale_format]
        lo = 6.2e-5 if dt == torch.float16 else 0.0  # fp16 scales stay normal
        torch.testing.assert_close(qt.scale, s_ref.clamp_min(lo).to(dt).float(), rtol=1e-2,
                                   atol=0)
        assert torch.equal(qt.scale, qt.scale.to(dt).float())

    s = expand(qt.scale, spec, x.shape).double()
    zp = expand(qt.zero_point, spec, x.shape).double() if qt.zero_point is not None else 0.0
    xh = dequantize(qt).double()
    err = (xh - x.double()).abs()
    # inside [(qmin - zp - 1/2) s, (qmax - zp + 1/2) s] rounding is to the nearest step
    # (a 1e-4 step margin absorbs float32 rounding of x / s: +amax lands on qmax + 1/2
    # with half-range scales)
    t = x.double() / s + zp
    inside = (t >= fmt.qmin - 0.5 - 1e-4) & (t <= fmt.qmax + 0.5 + 1e-4)
    tol = s * (0.5 + 1e-4) + 1e-45
    assert bool((err <= tol)[inside].all()), float((err / s)[inside].max())
    # beyond it (only with scales rounded to fp16/bf16) values saturate to the range ends
    hi, lo = (fmt.qmax - zp) * s, (fmt.qmin - zp) * s
    ends = torch.where(t > fmt.qmax, hi, lo)
    assert bool(((xh - ends).abs() <= 1e-6 * ends.abs())[~inside].all())
    if spec.scale_format == "fp32":
        assert bool(inside.all())  # dynamic fp32 scales clip nothing


@pytest.mark.parametrize("spec", [s for s in INT_SPECS if s.granularity == "channel"], ids=sid)
@FAST
@given(data=st.data(), frac=st.floats(0.1, 0.9))
def test_int_static_amax_clips_to_the_range_ends(spec, data, frac):
    x = data.draw(tensors_for(spec, kinds=["normal", "outliers", "uniform"], two_d=True))
    fmt = spec.element_format
    if spec.symmetric:
        amax, amin = unit_reduce(x, spec, "amax") * frac, None
    else:
        amax, amin = unit_reduce(x, spec, "max") * frac, unit_reduce(x, spec, "min") * frac
    qt = quantize(x, spec, amax=amax, amin=amin)
    assert same_bits(fake_quant(x, spec, amax=amax, amin=amin), dequantize(qt))
    s = expand(qt.scale, spec, x.shape).double()
    zp = expand(qt.zero_point, spec, x.shape).double() if qt.zero_point is not None else 0.0
    t = x.double() / s + zp
    xh = dequantize(qt).double()
    inside = (t >= fmt.qmin - 0.5 - 1e-4) & (t <= fmt.qmax + 0.5 + 1e-4)
    assert bool(((xh - x.double()).abs() <= s * (0.5 + 1e-4))[inside].all())
    assert bool(((xh / s + zp - fmt.qmax).abs() < 1e-3)[t > fmt.qmax + 0.5].all())
    assert bool(((xh / s + zp - fmt.qmin).abs() < 1e-3)[t < fmt.qmin - 0.5].all())


def test_static_amax_example_and_flat_channel_vector():
    x = torch.tensor([[0.3, 5.0, -9.0], [1.1, -0.25, 0.125]])
    spec = QuantSpec(format="int8", granularity="channel", sym_scale="qmax")
    y = fake_quant(x, spec, amax=torch.tensor([1.0, 2.0]))  # a flat per-channel vector works
    s = torch.tensor([[1.0], [2.0]]) / 127
    # 0.3 * 127 = 38.1; 5 and -9 clip to 127 and -128 (full range); row 1: 69.85, -15.875, 7.94
    want = torch.tensor([[38.0, 127.0, -128.0], [70.0, -16.0, 8.0]]) * s
    assert torch.allclose(y, want, rtol=1e-6, atol=0)
    assert same_bits(y, fake_quant(x, spec, amax=torch.tensor([[1.0], [2.0]])))


# --- affine: real 0.0 is exact ----------------------------------------------------------------


@pytest.mark.parametrize("spec", AFFINE_SPECS, ids=sid)
@FAST
@given(data=st.data(), density=st.floats(0.05, 0.5))
def test_affine_zero_is_exact(spec, data, density):
    x = data.draw(tensors_for(spec, kinds=["normal", "positive", "negative", "outliers",
                                           "huge"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    zero = torch.rand(x.shape, generator=g) < density
    x = x.masked_fill(zero, 0.0)
    qt = quantize(x, spec)
    y = dequantize(qt)
    assert bool((y[zero] == 0).all())
    assert bool((fake_quant(x, spec)[zero] == 0).all())
    # the code of 0.0 is the zero point
    zp = expand(qt.zero_point, spec, x.shape)
    assert torch.equal(spec.element_format.code_to_int(qt.codes)[zero].float(), zp[zero])


@pytest.mark.parametrize("spec", ALL_SPECS, ids=sid)
def test_zero_maps_to_zero_everywhere(spec):
    x = make(3, shapes_for(spec)[1], "outliers")
    x[..., ::5] = 0.0
    assert bool((fake_quant(x, spec)[..., ::5] == 0).all())
    assert bool((dequantize(quantize(x, spec))[..., ::5] == 0).all())


# --- fake_quant == dequantize(quantize) bit for bit, every format -----------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=sid)
@FAST
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fake_quant_is_dequantize_quantize_bit_for_bit(spec, data, dtype):
    x = data.draw(tensors_for(spec))
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    y = fake_quant(x, spec)
    qt = quantize(x, spec)
    z = dequantize(qt)
    assert y.dtype == z.dtype == dtype and y.shape == x.shape
    assert qt.dtype == dtype and qt.shape == tuple(x.shape)
    assert same_bits(y, z)
    assert torch.isfinite(y).all()
    # and with gradients on, the values do not change
    y2 = fake_quant(x.clone().requires_grad_(True), spec)
    assert y2.requires_grad and same_bits(y2.detach(), y)


@pytest.mark.parametrize("name", ["int8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2",
                                  "fp6_e2m3", "fp4_e2m1"])
def test_fake_quant_at_unit_scale_is_the_element_rounding(name, all_f16_bf16):
    # a static amax that makes the scale exactly 1: fake_quant (which rounds in place, its own
    # fast path) must then be the element format's rounding, over every float16 and bfloat16
    # value: every tie, subnormal, -0 and saturation case
    fmt = F.get(name)
    x = all_f16_bf16[torch.isfinite(all_f16_bf16)]
    spec = QuantSpec(format=name, sym_scale="qmax", symmetric=True)
    amax = torch.tensor(fmt.max)  # floats: s = amax / max; integers (qmax rule): amax / qmax
    y = fake_quant(x, spec, amax=amax)
    assert same_bits(y, fmt.round(x))
    assert same_bits(y, dequantize(quantize(x, spec, amax=amax)))
    if getattr(fmt, "torch_dtype", None):
        ref = x.clamp(-fmt.max, fmt.max).to(getattr(torch, fmt.torch_dtype)).float()
        assert same_bits(y, ref)
    if name.startswith("fp") and not fmt.torch_dtype:
        dt = {"fp6_e3m2": ml_dtypes.float6_e3m2fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
              "fp4_e2m1": ml_dtypes.float4_e2m1fn}[name]
        ref = x.clamp(-fmt.max, fmt.max).numpy().astype(dt).astype(np.float32)
        assert np.array_equal(y.numpy().view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=sid)
@FAST
@given(data=st.data(), frac=st.sampled_from([0.25, 1.0, 2.0]))
def test_fake_quant_bit_for_bit_with_static_statistics(spec, data, frac):
    x = data.draw(tensors_for(spec, two_d=True, kinds=["normal", "outliers", "positive"]))
    if spec.block_format is not None:
        kw = {"amax": x.abs().amax() * frac}  # NVFP4: the per-tensor amax
    elif spec.symmetric:
        kw = {"amax": unit_reduce(x, spec, "amax") * frac}
    else:
        kw = {"amax": unit_reduce(x, spec, "max") * frac,
              "amin": unit_reduce(x, spec, "min") * frac}
    assert same_bits(fake_quant(x, spec, **kw), dequantize(quantize(x, spec, **kw)))
    if frac == 1.0:  # the calibrated statistics are the dynamic ones: same result
        assert same_bits(fake_quant(x, spec, **kw), fake_quant(x, spec))


def test_fixed_scales_round_trip():
    # scale / zero_point / global_scale given (GPTQ, checkpoints): the same codes again
    x = make(5, (8, 64), "outliers")
    for spec in (INT_SPECS[4], AFFINE_SPECS[3], BLOCK_FORMAT_SPECS[0], BLOCK_FORMAT_SPECS[1]):
        qt = quantize(x, spec)
        qt2 = quantize(x, spec, scale=qt.scale, zero_point=qt.zero_point,
                       global_scale=qt.global_scale)
        assert torch.equal(qt.codes, qt2.codes), spec.short()
        y = fake_quant(x, spec, scale=qt.scale, zero_point=qt.zero_point,
                       global_scale=qt.global_scale)
        assert same_bits(y, dequantize(qt)), spec.short()
    with pytest.raises(FormatError, match="global_scale"):
        quantize(x, BLOCK_FORMAT_SPECS[0], scale=quantize(x, BLOCK_FORMAT_SPECS[0]).scale)


# --- zeros, NaN, Inf --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=sid)
def test_all_zero_tensor_gives_zeros(spec):
    for shape in shapes_for(spec)[:2]:
        x = torch.zeros(shape)
        qt = quantize(x, spec)
        assert torch.isfinite(qt.scale).all() and bool((qt.scale > 0).all())
        if qt.global_scale is not None:
            assert torch.isfinite(qt.global_scale) and float(qt.global_scale) > 0
        for y in (dequantize(qt), fake_quant(x, spec), fake_quant(x.bfloat16(), spec)):
            assert not torch.isnan(y).any() and bool((y == 0).all())


@pytest.mark.parametrize("spec", ALL_SPECS, ids=sid)
def test_all_zero_unit_gives_zeros(spec):
    x = make(11, shapes_for(spec)[1], "outliers")  # 2-D
    if spec.granularity == "block":  # the first row of tiles
        zero = (slice(0, spec.block[0]),)
    elif spec.granularity == "channel" and spec.axis % x.ndim == x.ndim - 1:
        zero = (..., 0)  # a column
    elif spec.granularity == "group" and spec.axis % x.ndim != x.ndim - 1:
        zero = (slice(0, spec.group_size),)
    else:
        zero = (0,)  # a row: a channel, a token, whole groups, or part of the tensor
    x[zero] = 0.0
    qt = quantize(x, spec)
    assert torch.isfinite(qt.scale).all() and bool((qt.scale > 0).all())
    for y in (dequantize(qt), fake_quant(x, spec)):
        assert torch.isfinite(y).all()
        assert bool((y[zero] == 0).all())


@pytest.mark.parametrize("spec", ALL_SPECS, ids=sid)
@settings(max_examples=6, deadline=None)
@given(data=st.data(), bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_nan_inf_raise_format_error(spec, data, bad):
    x = data.draw(tensors_for(spec, kinds=["normal"]))
    flat = x.view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = bad
    with pytest.raises(FormatError, match="NaN/Inf"):
        quantize(x, spec)
    with pytest.raises(FormatError, match="NaN/Inf"):
        fake_quant(x, spec)
    with pytest.raises(FormatError, match="NaN/Inf"):
        fake_quant(x.half(), spec)
    # static statistics (calibrated amax): the input is still checked
    kw = {"amax": torch.tensor(1.0)} if spec.granularity == "tensor" or spec.block_format \
        else None
    if kw is not None:
        if not spec.symmetric:
            kw["amin"] = torch.tensor(-1.0)
        with pytest.raises(FormatError, match="NaN/Inf"):
            fake_quant(x, spec, **kw)
        with pytest.raises(FormatError, match="NaN/Inf"):
            quantize(x, spec, **kw)


# --- straight-through estimator ---------------------------------------------------------------

STE_SPECS = [
    QuantSpec(format="int8"),
    QuantSpec(format="int8", sym_scale="qmax"),
    QuantSpec(format="int4", granularity="channel"),
    QuantSpec(format="int4", granularity="channel", narrow_range=True),
    QuantSpec(format="int4", granularity="group", group_size=16),
    QuantSpec(format="uint8", symmetric=False),
    QuantSpec(format="int4", granularity="group", group_size=16, symmetric=False),
    QuantSpec(format="fp8_e4m3"),
    QuantSpec(format="fp8_e4m3", granularity="channel"),
    QuantSpec(format="fp8_e5m2", granularity="token", dynamic=True),
    QuantSpec(format="fp6_e3m2", granularity="group", group_size=32),
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=16),
    QuantSpec(format="fp8_e4m3", granularity="block", block=(32, 32)),
] + BLOCK_FORMAT_SPECS


def clip_bounds(qt, spec, shape):
    """Per-element (s, zp, qmin, qmax): x is inside the clipping range iff
    qmin <= x / s + zp <= qmax (the q grid, in fake_quant's float32 arithmetic)."""
    fmt = spec.element_format
    s = expand(qt.scale, spec, shape)
    if qt.global_scale is not None:
        s = s * qt.global_scale
    zp = expand(qt.zero_point, spec, shape) if qt.zero_point is not None else None
    return s, zp, fmt.min, fmt.max


@pytest.mark.parametrize("spec", STE_SPECS, ids=sid)
@settings(max_examples=8, deadline=None)
@given(data=st.data(), frac=st.floats(0.2, 0.8),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
def test_ste_gradient_is_one_inside_zero_outside(spec, data, frac, dtype):
    x = data.draw(tensors_for(spec, kinds=["normal", "uniform", "outliers"], two_d=True))
    x = x.to(dtype).float().to(dtype)
    xf = x.float()
    # static statistics smaller than max |x|, so that some values clip
    if spec.block_format is not None:
        kw = {"amax": xf.abs().amax() * frac} if spec.block_format.global_scale else {}
    elif spec.symmetric:
        kw = {"amax": unit_reduce(xf, spec, "amax") * frac}
    else:
        kw = {"amax": unit_reduce(xf, spec, "max") * frac,
              "amin": unit_reduce(xf, spec, "min") * frac}
    xg = x.clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = fake_quant(xg, spec, **kw)
    (y.float() * w.float()).sum().backward()
    assert xg.grad.dtype == dtype
    qt = quantize(x, spec, **kw)
    s, zp, lo, hi = clip_bounds(qt, spec, x.shape)
    t = xf / s
    if zp is not None:
        t = t + zp
    inside = (t >= lo) & (t <= hi)
    if kw:  # clipping happens (MX elements may clip on their own, without statistics)
        assert not bool(inside.all()), "the test wants some clipped values"
        assert bool(inside.any())
    assert torch.equal(xg.grad, torch.where(inside, w, torch.zeros_like(w)))


def test_ste_gradient_example_int8():
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    fake_quant(x, QuantSpec(format="int8", sym_scale="qmax"), amax=torch.tensor(2.0)) \
        .sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 2.0).float())


def test_no_grad_mode_returns_plain_tensor():
    x = torch.randn(4, 32, requires_grad=True)
    with torch.no_grad():
        y = fake_quant(x, QuantSpec(format="int8"))
    assert not y.requires_grad


# --- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize("spec,shape,msg", [
    (QuantSpec(format="int4", granularity="group", group_size=48), (4, 64),
     "group size 48 does not divide dimension 1 of size 64 (shape [4, 64])"),
    (QuantSpec(format="int4", granularity="group", group_size=3, axis=0), (4, 64),
     "group size 3 does not divide dimension 0 of size 4"),
    (QuantSpec(format="nvfp4"), (4, 40), "group size 16 does not divide dimension 1 of size 40"),
    (QuantSpec(format="mxfp4"), (4, 48), "group size 32 does not divide dimension 1 of size 48"),
    (QuantSpec(format="int8", granularity="channel", axis=2), (4, 64),
     "axis 2 is out of range"),
    (QuantSpec(format="fp8_e4m3", granularity="block", block=(4, 4)), (64,),
     "2 or more dimensions"),
])
def test_bad_granularity_for_shape_is_config_error(spec, shape, msg):
    x = torch.randn(shape)
    for fn in (quantize, fake_quant):
        with pytest.raises(ConfigError) as e:
            fn(x, spec)
        assert msg in str(e.value) and "\n" not in str(e.value)
    if "group size" in msg:
        assert "choose a group size that divides it" in str(e.value)


# --- NVFP4 ------------------------------------------------------------------------------------


@FAST
@given(x=tensors_for(QuantSpec(format="nvfp4"), two_d=True,
                     kinds=["normal", "outliers", "tiny", "huge", "sparse"]))
def test_nvfp4_scales_and_elements(x):
    spec = QuantSpec(format="nvfp4")
    qt = quantize(x, spec)
    rows, cols = x.shape
    assert qt.scale.shape == (rows, cols // 16) and qt.scale.dtype == torch.float32
    assert qt.spec.scale_format == "e4m3"
    # block scales are e4m3 values: their codes decode back to them exactly
    codes = qt.scale_codes()
    assert codes.dtype == torch.uint8
    assert torch.equal(F.get("e4m3").decode(codes), qt.scale)
    assert torch.equal(codes.view(torch.float8_e4m3fn).float(), qt.scale)
    # global scale = amax / (6 * 448), float32
    amax = x.abs().amax()
    gs = amax / (6 * 448) if amax > 0 else torch.tensor(1.0)
    assert qt.global_scale.shape == () and float(qt.global_scale) == float(gs)
    # block scale = e4m3(amax(block) / 6 / global), at least e4m3's smallest subnormal (ml_dtypes)
    bamax = x.reshape(rows, cols // 16, 16).abs().amax(-1).numpy()
    want = (bamax / np.float32(6) / np.float32(gs)).astype(np.float32)
    want = np.minimum(want, np.float32(448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = np.maximum(want, np.float32(2.0**-9))
    assert np.array_equal(qt.scale.numpy(), want)
    # elements are e2m1 values within +-6; x_hat = e2m1 * block scale * global scale
    e = F.get("fp4_e2m1").decode(qt.codes)
    assert float(e.abs().max()) <= 6.0
    s = qt.scale.repeat_interleave(16, dim=1) * qt.global_scale
    assert same_bits(dequantize(qt), e * s)
    # independent element rounding: ml_dtypes e2m1 of clip(x / s)
    t = (x / s).clamp(-6, 6).numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert np.array_equal(e.numpy(), t)


def test_nvfp4_elements_saturate():
    # a static per-tensor amax below the data: the block scale saturates at e4m3's 448 and
    # the element at e2m1's 6 (100 / (448 * 10 / 2688) = 60 -> 6; 1 -> 0.6 -> 0.5)
    spec = QuantSpec(format="nvfp4")
    big = torch.tensor([[100.0, -100.0] + [1.0] * 14])
    qt = quantize(big, spec, amax=torch.tensor(10.0))
    assert qt.scale.tolist() == [[448.0]]
    assert F.get("fp4_e2m1").decode(qt.codes)[0, :3].tolist() == [6.0, -6.0, 0.5]
    y = fake_quant(big, spec, amax=torch.tensor(10.0))
    assert same_bits(y, dequantize(qt)) and float(y[0, 0]) == float(6 * 448 * qt.global_scale)


# --- MX (OCP MX v1.0) -------------------------------------------------------------------------

MX_EMAX = {"mxfp4": 2, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2, "mxfp8_e4m3": 8, "mxfp8_e5m2": 15}
ML_ELEMENT = {"mxfp4": ml_dtypes.float4_e2m1fn, "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
              "mxfp6_e2m3": ml_dtypes.float6_e2m3fn, "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
              "mxfp8_e5m2": ml_dtypes.float8_e5m2}


def ocp_shared_exponent(block: np.ndarray, emax: int) -> int:
    """X = floor(log2(amax)) - emax_elem, clamped to e8m0's [-127, 127]; zero block -> -127."""
    amax = float(np.max(np.abs(block)))
    if amax == 0.0:
        return -127
    _, e = math.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2 amax) = e - 1
    return max(-127, min(127, (e - 1) - emax))


@pytest.mark.parametrize("name", list(MX_EMAX))
@FAST
@given(x=tensors_for(QuantSpec(format="mxfp4"), two_d=True,
                     kinds=["normal", "outliers", "tiny", "huge", "sparse", "positive"]))
def test_mx_scales_follow_ocp(name, x):
    spec = QuantSpec(format=name)
    fmt = spec.element_format
    assert fmt.emax == MX_EMAX[name]
    qt = quantize(x, spec)
    rows, cols = x.shape
    assert qt.scale.shape == (rows, cols // 32) and qt.global_scale is None
    xn = x.numpy()
    for r in {0, rows // 2, rows - 1}:
        for b in {0, cols // 32 - 1}:
            block = xn[r, 32 * b:32 * (b + 1)]
            expect = 2.0 ** ocp_shared_exponent(block, MX_EMAX[name])
            assert float(qt.scale[r, b]) == expect, (r, b)
    # every scale is a power of two and an e8m0 value
    m, _ = torch.frexp(qt.scale)
    assert bool((m == 0.5).all())
    assert torch.equal(F.get("e8m0").decode(qt.scale_codes()), qt.scale)
    # elements: round-to-nearest-even with saturation (ml_dtypes of the clipped value)
    s = qt.scale.repeat_interleave(32, dim=1)
    want = (x / s).clamp(-fmt.max, fmt.max).numpy().astype(ML_ELEMENT[name]).astype(np.float32)
    assert np.array_equal(fmt.decode(qt.codes).numpy(), want)


@pytest.mark.parametrize("name,big,sat", [
    ("mxfp4", 7.5, 6.0),          # X = 2 - 2 = 0: 7.5 -> 6
    ("mxfp6_e2m3", 7.9, 7.5),     # X = 0: 7.9 -> 7.5
    ("mxfp6_e3m2", 31.0, 28.0),   # X = 4 - 4 = 0: 31 -> 28
    ("mxfp8_e4m3", 500.0, 448.0),  # X = 8 - 8 = 0: 500 -> 448, not NaN
    ("mxfp8_e5m2", 65000.0, 57344.0),  # X = 15 - 15 = 0: 65000 -> 57344, not Inf
])
def test_mx_elements_saturate(name, big, sat):
    x = torch.ones(2, 32)
    x[0, 5], x[1, 7] = big, -big
    qt = quantize(x, QuantSpec(format=name))
    assert qt.scale.tolist() == [[1.0], [1.0]]
    y = dequantize(qt)
    assert float(y[0, 5]) == sat and float(y[1, 7]) == -sat
    assert torch.isfinite(y).all()
    assert same_bits(fake_quant(x, QuantSpec(format=name)), y)


def test_mx_scale_clamps_to_e8m0_range():
    x = torch.full((1, 64), 1e-38)
    x[0, 32:] = 3e38
    qt = quantize(x, QuantSpec(format="mxfp4"))
    # floor(log2 1e-38) - 2 = -129 -> -127; floor(log2 3e38) - 2 = 125
    assert qt.scale.tolist() == [[2.0**-127, 2.0**125]]


# --- storage size -----------------------------------------------------------------------------


def test_nbytes_int4_g64():
    qt = quantize(torch.randn(128, 256), QuantSpec(format="int4", granularity="group",
                                                   group_size=64))
    assert qt.nbytes() == 128 * 256 / 2 + 128 * 4 * 4


@pytest.mark.parametrize("spec,want", [
    (QuantSpec(format="int4", granularity="group", group_size=64, symmetric=False),
     128 * 256 // 2 + 128 * 4 * 4 + 128 * 4 // 2),  # + 4-bit zero points
    (QuantSpec(format="int8", granularity="channel"), 128 * 256 + 128 * 4),
    (QuantSpec(format="fp8_e4m3"), 128 * 256 + 4),
    (QuantSpec(format="fp6_e3m2", granularity="group", group_size=32), 128 * 256 * 3 // 4
     + 128 * 8 * 4),
    (QuantSpec(format="nvfp4"), 128 * 256 // 2 + 128 * 16 + 4),
    (QuantSpec(format="mxfp4"), 128 * 256 // 2 + 128 * 8),
    (QuantSpec(format="mxfp6_e2m3"), 128 * 256 * 3 // 4 + 128 * 8),
])
def test_nbytes_other_formats(spec, want):
    assert quantize(torch.randn(128, 256), spec).nbytes() == want


@pytest.mark.parametrize("spec", [
    QuantSpec(format="int4", granularity="channel"),
    QuantSpec(format="int4", granularity="channel", symmetric=False),
    QuantSpec(format="int8", granularity="channel"),
    QuantSpec(format="fp8_e4m3", granularity="channel"),
    QuantSpec(format="fp4_e2m1", granularity="channel"),
    QuantSpec(format="fp6_e3m2", granularity="channel"),
])
def test_fake_quant_fixed_is_fake_quant_with_fixed_scales(spec):
    # GPTQ's per-column rounding: fake_quant_fixed(w [out], s [out]) equals fake_quant of the
    # column [out, 1] with the same stored scales, bit for bit (ties and clipping included)
    from lowbit.core import fake_quant_fixed

    g = torch.Generator().manual_seed(0)
    w = torch.randn(257, generator=g) * 3
    s = torch.rand(257, generator=g) * 0.5 + 0.01
    w[:8] = s[:8] * torch.tensor([0.5, 1.5, -2.5, 100.0, -100.0, 0.0, -0.0, 7.5])
    zp = None if spec.symmetric else torch.randint(0, 16, (257,), generator=g).float()
    want = fake_quant(w[:, None], spec, scale=s[:, None],
                      zero_point=None if zp is None else zp[:, None])[:, 0]
    got = fake_quant_fixed(w, spec, s, zp)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
