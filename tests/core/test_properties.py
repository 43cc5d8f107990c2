"""Properties of quantize/dequantize/fake_quant over random tensors (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import QuantSpec, dequantize, fake_quant, quantize
from lowbit.errors import ConfigError, FormatError

INT_SPECS = [
    QuantSpec(format="int8"),
    QuantSpec(format="int8", granularity="channel"),
    QuantSpec(format="int4", granularity="group", group_size=16),
    QuantSpec(format="int4", granularity="group", group_size=16, symmetric=False),
    QuantSpec(format="uint8", granularity="channel", symmetric=False),
    QuantSpec(format="int3", granularity="token", dynamic=True),
    QuantSpec(format="int2", granularity="channel", axis=1),
]
ALL_SPECS = INT_SPECS + [
    QuantSpec(format="fp8_e4m3"), QuantSpec(format="fp8_e5m2", granularity="channel"),
    QuantSpec(format="fp6_e3m2", granularity="group", group_size=32),
    QuantSpec(format="fp6_e2m3", granularity="group", group_size=32),
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=16),
    QuantSpec(format="fp8_e4m3", granularity="block", block=(24, 40)),
] + [QuantSpec(format=f) for f in ("nvfp4", "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3",
                                    "mxfp8_e4m3", "mxfp8_e5m2")]

tensors = st.builds(
    lambda seed, scale, rows: torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed))
    * scale,
    st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 1.0, 300.0]), st.sampled_from([1, 5, 48]))


@settings(max_examples=25, deadline=None)
@given(x=tensors, i=st.integers(0, len(INT_SPECS) - 1))
def test_int_error_at_most_half_a_step(x, i):
    spec = INT_SPECS[i]
    qt = quantize(x, spec)
    fmt = spec.element_format
    q = fmt.code_to_int(qt.codes)
    assert int(q.min()) >= fmt.qmin and int(q.max()) <= fmt.qmax
    err = (dequantize(qt) - x).abs()
    # the scale broadcast to x: dequantize of all-ones codes scale, via a spec-free trick
    s = (dequantize(qt.__class__(torch.ones_like(qt.codes), qt.scale, None, spec, qt.shape,
                                 qt.dtype)))
    step = s.abs() if spec.symmetric else qt.scale.max()
    # half_range scales put +amax half a step beyond the top code: still within s/2
    assert bool((err <= step / 2 * (1 + 1e-4) + 1e-30).all())


@settings(max_examples=25, deadline=None)
@given(x=tensors, i=st.integers(0, len(ALL_SPECS) - 1),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fake_quant_equals_dequantize_quantize_bit_for_bit(x, i, dtype):
    spec = ALL_SPECS[i]
    x = x.to(dtype)
    a = fake_quant(x, spec)
    b = dequantize(quantize(x, spec))
    assert a.dtype == b.dtype == dtype
    assert torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


@pytest.mark.parametrize("spec", [s for s in INT_SPECS if not s.symmetric])
def test_affine_zero_is_exact(spec):
    x = torch.rand(8, 64) * 3 + 0.5
    x[:, ::7] = 0.0
    y = fake_quant(x, spec)
    assert bool((y[:, ::7] == 0).all())


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_zeros_give_zeros(spec):
    x = torch.zeros(48, 64)
    x[1] = torch.randn(64)  # one non-zero row, the rest all zero
    y = fake_quant(x, spec)
    assert torch.isfinite(y).all()
    assert bool((y[2:] == 0).all())


def test_nan_inf_raise():
    for bad in (float("nan"), float("inf")):
        x = torch.ones(4, 16)
        x[1, 3] = bad
        with pytest.raises(FormatError, match="NaN/Inf"):
            quantize(x, QuantSpec(format="int8"))
        with pytest.raises(FormatError, match="NaN/Inf"):
            fake_quant(x, QuantSpec(format="int8"), amax=torch.tensor(1.0))


def test_ste_gradient():
    spec = QuantSpec(format="int8", sym_scale="qmax")
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    amax = torch.tensor(2.0)
    y = fake_quant(x, spec, amax=amax)
    y.sum().backward()
    inside = x.detach().abs() <= 2.0
    assert torch.equal(x.grad, inside.float())
    # default half-range scales: the clipping range is [-128 s, 127 s], s = amax / 127.5
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    fake_quant(x, QuantSpec(format="int8"), amax=amax).sum().backward()
    s = 2.0 / 127.5
    inside = (x.detach() >= -128 * s) & (x.detach() <= 127 * s)
    assert torch.equal(x.grad, inside.float())
    # affine: the clipping range is [(qmin - zp) * s, (qmax - zp) * s]
    spec = QuantSpec(format="uint4", symmetric=False)
    x = torch.linspace(-1, 4, 51, requires_grad=True)
    fake_quant(x, spec, amax=torch.tensor(3.0), amin=torch.tensor(0.0)).sum().backward()
    assert torch.equal(x.grad, ((x.detach() >= 0) & (x.detach() <= 3.0)).float())


def test_static_amax_clips():
    x = torch.tensor([0.5, 5.0, -9.0])
    y = fake_quant(x, QuantSpec(format="int8", sym_scale="qmax"), amax=torch.tensor(1.0))
    assert y.tolist()[1:] == [1.0, torch.tensor(-128 / 127).item()]  # full range keeps -128
    y = fake_quant(x, QuantSpec(format="int8", narrow_range=True), amax=torch.tensor(1.0))
    assert y.tolist()[1:] == [1.0, -1.0]


def test_group_size_must_divide():
    with pytest.raises(ConfigError, match="group size 48 does not divide dimension 1 of size 64"):
        quantize(torch.randn(4, 64), QuantSpec(format="int4", granularity="group",
                                               group_size=48))


@pytest.mark.parametrize("data,msg", [
    ({"format": "int9"}, "unknown format 'int9'"),
    ({"format": "fp8_e4m3", "symmetric": False}, "asymmetric"),
    ({"format": "int8", "granularity": "token"}, "dynamic: true"),
    ({"format": "nvfp4", "group_size": 32}, "groups of 16"),
    ({"format": "e8m0"}, "scale format"),
    ({"format": "int8", "colour": 1}, "unknown key 'colour'"),
])
def test_spec_errors(data, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        QuantSpec.parse(data)
    assert "\n" not in str(e.value)


def test_nvfp4_scales():
    x = torch.randn(32, 64)
    spec = QuantSpec(format="nvfp4")
    qt = quantize(x, spec)
    assert qt.scale.shape == (32, 4)
    from lowbit.formats import get

    assert torch.equal(get("e4m3").decode(qt.scale_codes()), qt.scale)
    assert torch.isclose(qt.global_scale, x.abs().max() / (6 * 448))


def test_mx_scales_follow_ocp():
    import math

    x = torch.randn(4, 64) * 10
    emax = {"mxfp4": 2, "mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2}
    for name, e in emax.items():
        qt = quantize(x, QuantSpec(format=name))
        for r in range(4):
            for b in range(2):
                amax = float(x[r, 32 * b:32 * (b + 1)].abs().max())
                expect = 2.0 ** (math.floor(math.log2(amax)) - e)
                assert float(qt.scale[r, b]) == expect, name


def test_nbytes_int4_g64():
    qt = quantize(torch.randn(128, 256), QuantSpec(format="int4", granularity="group",
                                                   group_size=64))
    assert qt.nbytes() == 128 * 256 // 2 + 128 * 4 * 4
