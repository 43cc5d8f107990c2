"""Learnable-scale fake quantization: forward equals core, gradients (STE / LSQ) checked
against finite differences of the LSQ surrogate with torch.autograd.gradcheck in float64."""

import pytest
import torch

from lowbit.core import QuantSpec, compute_scales, fake_quant
from lowbit.errors import ConfigError
from lowbit.training import learnable_fake_quant

INT4_G = QuantSpec(format="int4", granularity="group", group_size=8)
INT4_G_ASYM = QuantSpec(format="int4", granularity="group", group_size=8, symmetric=False)
FP8_T = QuantSpec(format="fp8_e4m3", granularity="tensor")
INT8_CH = QuantSpec(format="int8", granularity="channel", axis=0)


def _weight(seed=0, shape=(4, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _ptq_scale(w, spec):
    lay, _, s, zp, _ = compute_scales(w, spec)
    return lay.to_natural(s), None if zp is None else lay.to_natural(zp)


@pytest.mark.parametrize("spec", [INT4_G, INT4_G_ASYM, FP8_T, INT8_CH])
def test_forward_equals_core_fake_quant(spec):
    w = _weight()
    s, zp = _ptq_scale(w, spec)
    s = (s * 0.8).requires_grad_()  # a scale that clips some values
    y = learnable_fake_quant(w, spec, scale=s, zero_point=zp)
    assert torch.equal(y, fake_quant(w, spec, scale=s.detach(), zero_point=zp))
    a = torch.tensor(1.7, requires_grad=True)
    spec_t = QuantSpec(format="int4", granularity="tensor")
    assert torch.equal(learnable_fake_quant(w, spec_t, amax=a),
                       fake_quant(w, spec_t, amax=a.detach()))


def test_ste_gradient_of_x_is_the_clipping_mask():
    spec = QuantSpec(format="int4", granularity="tensor")
    x = torch.tensor([-3.0, -0.4, 0.0, 0.3, 0.99, 1.2, 5.0], requires_grad=True)
    amax = torch.tensor(1.0)  # scale 1/7.5: codes -8..7 cover [-8/7.5, 7/7.5]
    # the frozen path (lowbit.core's STE) and the learnable one agree
    fake_quant(x, spec, amax=amax).sum().backward()
    g_core = x.grad.clone()
    x.grad = None
    learnable_fake_quant(x, spec, amax=amax.clone().requires_grad_()).sum().backward()
    expected = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # 0.99 * 7.5 > 7
    assert torch.equal(g_core, expected)
    assert torch.equal(x.grad, expected)


def _surrogate(spec, x0, s0, zp=None):
    """LSQ's function of (x, s) around (x0, s0): rounding replaced by a frozen offset.

    ``f(x, s) = s * (clamp(x / s + zp) - zp + r0)`` with ``r0 = Q(u0) - clamp(u0)`` from the
    base point: its exact derivatives are the STE/LSQ gradients."""
    fmt = spec.element_format
    lay, xv0, sv0, zpv, _ = compute_scales(x0.float(), spec, scale=s0.float(),
                                           zero_point=zp)
    u0 = xv0 / sv0 + (0 if zpv is None else zpv)
    yv0 = lay.view(fake_quant(x0.float(), spec, scale=s0.float(), zero_point=zp))
    q0 = yv0 / sv0 + (0 if zpv is None else zpv)
    r0 = (q0 - u0.clamp(fmt.min, fmt.max)).double()
    zpd = None if zpv is None else zpv.double()

    def f(x, s):
        xv = lay.view(x)
        g = spec.granularity
        sv = s.reshape([1] * xv.ndim) if g == "tensor" else s.unsqueeze(-1)  # group, axis -1
        z = 0 if zpd is None else zpd
        return lay.unview(sv * ((xv / sv + z).clamp(fmt.min, fmt.max) + r0 - z))
    return f


@pytest.mark.parametrize("spec", [INT4_G, INT4_G_ASYM, FP8_T])
def test_lsq_scale_gradient_matches_finite_differences(spec):
    torch.manual_seed(0)
    w = _weight(1)
    s, zp = _ptq_scale(w, spec)
    s = s * 0.7  # clip the largest values of each unit: both gradient regimes occur
    x0, s0 = w.double().requires_grad_(), s.double().requires_grad_()
    # keep away from the clipping edges, where the surrogate has kinks
    fmt = spec.element_format
    lay, xv, sv, zpv, _ = compute_scales(w, spec, scale=s, zero_point=zp)
    u = xv / sv + (0 if zpv is None else zpv)
    assert float(((u - fmt.max).abs().min())) > 1e-3 and float((u - fmt.min).abs().min()) > 1e-3
    assert bool((u > fmt.max).any()) and bool(((u > fmt.min) & (u < fmt.max)).any())
    f = _surrogate(spec, w, s, zp)
    assert torch.allclose(f(x0, s0).float(), fake_quant(w, spec, scale=s, zero_point=zp),
                          atol=1e-6)

    def h(x, sc):  # the value of the surrogate, the gradient of learnable_fake_quant
        y = learnable_fake_quant(x, spec, scale=sc, zero_point=zp)
        return y + (f(x, sc) - y).detach()

    assert torch.autograd.gradcheck(h, (x0, s0), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_lsq_amax_gradient_matches_finite_differences():
    spec = QuantSpec(format="fp8_e4m3", granularity="tensor")
    x = _weight(2, (3, 20)) * 10
    a0 = torch.tensor(18.0, dtype=torch.float64, requires_grad=True)
    x64 = x.double().requires_grad_()
    f = _surrogate(spec, x, a0.detach().float() / 448.0)

    def h(xx, a):
        y = learnable_fake_quant(xx, spec, amax=a)
        return y + (f(xx, a / 448.0) - y).detach()

    assert bool((x.abs() > 18.0).any())
    assert torch.autograd.gradcheck(h, (x64, a0), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_learnable_errors():
    w = _weight()
    with pytest.raises(ConfigError, match="exactly one"):
        learnable_fake_quant(w, INT4_G)
    with pytest.raises(ConfigError, match="block-scaled format nvfp4"):
        learnable_fake_quant(w, QuantSpec(format="nvfp4"), scale=torch.ones(4, 1))
    with pytest.raises(ConfigError, match="symmetric"):
        learnable_fake_quant(w, QuantSpec(format="int8", symmetric=False),
                             amax=torch.tensor(1.0))
