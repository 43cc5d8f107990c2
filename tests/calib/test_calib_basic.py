"""Calibrators: max, percentile, mse, entropy; per tensor and per channel; merging."""

import pytest
import torch

from lowbit.calib import calibrator_names, get_calibrator
from lowbit.core import QuantSpec, fake_quant
from lowbit.errors import CalibrationError, ConfigError

T8 = QuantSpec(format="int8")
C8 = QuantSpec(format="int8", granularity="channel", axis=-1)


def batches(seed=0, n=4, outliers=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 32, 16, generator=g)
        if outliers:
            x[0, 0, :] *= 40  # a few huge values
        out.append(x)
    return out


def test_registry():
    assert {"max", "percentile", "mse", "entropy"} <= set(calibrator_names())
    with pytest.raises(ConfigError, match="unknown calibrator 'kl'"):
        get_calibrator("kl", T8)


def test_max_tensor_and_channel():
    xs = batches()
    c = get_calibrator("max", T8)
    cc = get_calibrator("max", C8)
    for x in xs:
        c.observe(x)
        cc.observe(x)
    allx = torch.cat(xs)
    assert c.compute()["amax"] == allx.abs().max()
    assert torch.equal(cc.compute()["amax"], allx.abs().amax((0, 1)))


def test_max_asymmetric():
    c = get_calibrator("max", QuantSpec(format="uint8", symmetric=False))
    x = torch.rand(100) + 0.5
    c.observe(x)
    s = c.compute()
    assert s["amax"] == x.max() and s["amin"] == x.min()


def test_percentile_matches_quantile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g)
    c = get_calibrator("percentile", T8, percentile=99.0)
    for part in x.chunk(4):
        c.observe(part)
    ref = torch.quantile(x.abs(), 0.99)
    width = x.abs().max() / 2048
    assert abs(c.compute()["amax"] - ref) <= 2 * width


@pytest.mark.parametrize("name", ["mse", "entropy"])
def test_clipping_calibrators_clip_outliers_and_reduce_error(name):
    xs = batches()
    c = get_calibrator(name, T8)
    for x in xs:
        c.observe(x)
    amax = c.compute()["amax"]
    allx = torch.cat(xs)
    mx = allx.abs().max()
    assert amax < mx
    if name == "mse":
        err = ((fake_quant(allx, T8, amax=amax) - allx) ** 2).mean()
        err_max = ((fake_quant(allx, T8, amax=mx) - allx) ** 2).mean()
        assert err < err_max
    else:
        assert amax > torch.quantile(allx.abs().flatten()[:100000], 0.99)


def test_mse_per_channel_shape():
    c = get_calibrator("mse", C8)
    for x in batches():
        c.observe(x)
    assert c.compute()["amax"].shape == (16,)


@pytest.mark.parametrize("name", ["max", "percentile", "mse"])
def test_merge_equals_single_pass(name):
    xs = batches(n=4)
    one = get_calibrator(name, T8)
    for x in xs:
        one.observe(x)
    a, b = get_calibrator(name, T8), get_calibrator(name, T8)
    for x in xs[:2]:
        a.observe(x)
    for x in xs[2:]:
        b.observe(x)
    m = get_calibrator(name, T8)
    m.merge_states([a.state_dict(), b.state_dict()])
    if name == "max":
        assert torch.equal(m.compute()["amax"], one.compute()["amax"])
    else:  # histograms re-binned onto the common range: equal up to one bin
        w = torch.cat(xs).abs().max() / 2048
        assert abs(m.compute()["amax"] - one.compute()["amax"]) <= 2 * w


def test_no_data_and_bad_granularity():
    with pytest.raises(CalibrationError, match="saw no data"):
        get_calibrator("max", T8).compute()
    with pytest.raises(ConfigError, match="tensor and channel"):
        get_calibrator("max", QuantSpec(format="int4", granularity="group", group_size=32))
    nv = get_calibrator("max", QuantSpec(format="nvfp4"))  # per-tensor global amax
    nv.observe(torch.ones(4, 32))
    assert nv.compute()["amax"].shape == ()
