"""GPTQ on one linear layer: better than round-to-nearest, exact on its grid, robust."""

import warnings

import pytest
import torch

from lowbit.algorithms import HessianAccumulator, gptq_quantize_weight
from lowbit.core import QuantSpec, fake_quant

SPECS = [
    QuantSpec(format="int4", granularity="group", group_size=32),
    QuantSpec(format="int4", granularity="group", group_size=32, symmetric=False),
    QuantSpec(format="int3", granularity="channel"),
    QuantSpec(format="nvfp4"), QuantSpec(format="mxfp4"),
    QuantSpec(format="fp8_e4m3", granularity="channel"),
    QuantSpec(format="int8"),
]


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    n_in, n_out, n = 128, 64, 2048
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5
    z = torch.randn(n, n_in, generator=g)
    z[:, :4] *= 10  # a few high-variance directions
    x = z @ mix  # correlated inputs
    w = torch.randn(n_out, n_in, generator=g)
    acc = HessianAccumulator(n_in)
    for part in x.split(500):
        acc.add(part)
    return w, x, acc


def test_hessian_accumulator(layer):
    w, x, acc = layer
    assert torch.allclose(acc.H, 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-5)
    a, b = HessianAccumulator(x.shape[1]), HessianAccumulator(x.shape[1])
    a.add(x[:700])
    b.add(x[700:])
    merged = HessianAccumulator(x.shape[1])
    sa, sb = a.state_dict(), b.state_dict()
    merged.load_state_dict({"sum": sa["sum"] + sb["sum"], "n": sa["n"] + sb["n"]})
    assert torch.allclose(merged.H, acc.H, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_and_is_exact_on_its_grid(layer, spec, act_order):
    w, x, acc = layer
    r = gptq_quantize_weight(w, acc.H, spec, act_order=act_order)
    again = fake_quant(r.weight, spec, scale=r.scale, zero_point=r.zero_point,
                       global_scale=r.global_scale)
    assert torch.equal(again, r.weight)
    err_gptq = ((r.weight - w) @ x.T).norm()
    err_rtn = ((fake_quant(w, spec) - w) @ x.T).norm()
    assert err_gptq < 0.7 * err_rtn


def test_act_order_permutation(layer):
    w, x, acc = layer
    spec = QuantSpec(format="int4", granularity="group", group_size=32)
    r = gptq_quantize_weight(w, acc.H, spec, act_order=True)
    d = torch.diag(acc.H)
    assert torch.equal(torch.sort(r.perm).values, torch.arange(w.shape[1]))
    assert bool((d[r.perm][:-1] >= d[r.perm][1:]).all())
    # columns come back in natural order: each column's values sit on its own group's grid
    assert torch.equal(fake_quant(r.weight, spec, scale=r.scale), r.weight)
    # with a diagonal, constant Hessian there is no error to spread: GPTQ == RTN
    h = torch.eye(w.shape[1]) * 2.0
    r2 = gptq_quantize_weight(w, h, spec, act_order=True, percdamp=0.0)
    assert torch.allclose(r2.weight, fake_quant(w, spec))


def test_failed_cholesky_raises_damping_with_warning():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    h = -torch.eye(32)  # not positive definite
    spec = QuantSpec(format="int4", granularity="group", group_size=16)
    with pytest.warns(UserWarning, match="Cholesky failed"):
        r = gptq_quantize_weight(w, h, spec, percdamp=0.0, max_retries=40)
    assert torch.isfinite(r.weight).all() and r.damp > 0


def test_dead_inputs():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 5] = 0
    w = torch.randn(8, 32)
    r = gptq_quantize_weight(w, 2 / 256 * x.T @ x, QuantSpec(format="int8",
                                                               granularity="channel"))
    assert bool((r.weight[:, 5] == 0).all())
