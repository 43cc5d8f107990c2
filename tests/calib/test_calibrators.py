"""lowbit.calib: max, percentile, mse, entropy; per tensor / per channel; merging; errors."""

import threading

import numpy as np
import pytest
import torch

from lowbit.calib import Calibrator, calibrator_names, get_calibrator, register_calibrator
from lowbit.calib.histogram import kl_divergences
from lowbit.core import Layout, QuantSpec, fake_quant
from lowbit.errors import CalibrationError, ConfigError

T8 = QuantSpec(format="int8")
C8 = QuantSpec(format="int8", granularity="channel", axis=-1)
A8 = QuantSpec(format="uint8", symmetric=False)
NAMES = ["max", "percentile", "mse", "entropy"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def heavy_batches(seed=0, n=4, hidden=16):
    """Gaussian activations [8, seq, hidden] with a few huge outliers (one token x40)."""
    g = gen(seed)
    out = []
    for i in range(n):
        x = torch.randn(8, 24 + 4 * i, hidden, generator=g)
        x[0, 0, :] *= 40
        out.append(x)
    return out


def mse(x, amax, spec=T8):
    return float(((fake_quant(x, spec, amax=amax) - x) ** 2).mean())


# --- registry and errors ---------------------------------------------------------------------
def test_registry_and_unknown_names(monkeypatch):
    from lowbit.calib import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # keep the test's entry local
    assert set(NAMES) <= set(calibrator_names())
    with pytest.raises(ConfigError, match=r"unknown calibrator 'kl'.*max, percentile, mse"):
        get_calibrator("kl", T8)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) bins.*num_bins"):
        get_calibrator("percentile", T8, bins=10)
    with pytest.raises(ConfigError, match="percentile must be in"):
        get_calibrator("percentile", T8, percentile=0)

    @register_calibrator("test_const")
    class Const(Calibrator):
        def _compute(self):
            return torch.ones_like(self.amax), None

    c = get_calibrator("test_const", T8)
    c.observe(torch.randn(3, 4))
    assert c.compute()["amax"] == 1
    with pytest.raises(ConfigError, match="registered twice"):
        register_calibrator("max")(Const)


@pytest.mark.parametrize("name", NAMES)
def test_compute_before_observe(name):
    c = get_calibrator(name, T8)
    with pytest.raises(CalibrationError, match="saw no data"):
        c.compute()
    c.observe(torch.empty(0, 16))  # empty tensors are ignored
    with pytest.raises(CalibrationError, match="saw no data"):
        c.compute()
    c.observe(torch.randn(4, 16))
    c.reset()
    with pytest.raises(CalibrationError, match="saw no data"):
        c.compute()


@pytest.mark.parametrize("name", NAMES)
def test_granularities_computed_at_run_time_are_rejected(name):
    for spec in (QuantSpec(format="int4", granularity="group", group_size=32),
                 QuantSpec(format="fp8_e4m3", granularity="block", block=(128, 128)),
                 QuantSpec(format="fp8_e4m3", granularity="token", dynamic=True),
                 QuantSpec(format="mxfp4")):
        with pytest.raises(ConfigError, match="tensor and channel granularities only"):
            get_calibrator(name, spec)
    if name != "max":  # only max sets nvfp4's per-tensor global amax
        with pytest.raises(ConfigError, match="tensor and channel granularities only"):
            get_calibrator(name, QuantSpec(format="nvfp4"))


def test_nvfp4_max_is_per_tensor():
    c = get_calibrator("max", QuantSpec(format="nvfp4"))
    xs = heavy_batches()
    for x in xs:
        c.observe(x)
    amax = c.compute()["amax"]
    assert amax.shape == () and amax == torch.cat([x.flatten() for x in xs]).abs().max()
    fake_quant(xs[0], QuantSpec(format="nvfp4"), amax=amax)  # sets the global scale


def test_bad_inputs():
    c = get_calibrator("percentile", C8)
    c.observe(torch.randn(2, 3, 16))
    with pytest.raises(CalibrationError, match="8 channels"):
        c.observe(torch.randn(2, 3, 8))
    x = torch.randn(4, 16)
    x[1, 2] = float("nan")
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        get_calibrator("max", T8).observe(x)
    with pytest.raises(ConfigError, match="symmetric specs only"):
        get_calibrator("entropy", A8)


# --- max -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_max_per_tensor(dtype):
    xs = [x.to(dtype) for x in heavy_batches()]
    c = get_calibrator("max", T8)
    for x in xs:
        c.observe(x)
    amax = c.compute()["amax"]
    assert amax.shape == () and amax.dtype == torch.float32
    assert amax == max(x.abs().max().float() for x in xs)


def test_max_per_channel_shape_and_values():
    xs = heavy_batches(hidden=16)  # seq lengths differ per batch
    c = get_calibrator("max", C8)
    for x in xs:
        c.observe(x)
    amax = c.compute()["amax"]
    assert amax.shape == Layout(C8, xs[0].shape).natural_shape() == (1, 1, 16)
    ref = torch.stack([x.abs().amax((0, 1)) for x in xs]).amax(0)
    assert torch.equal(amax.flatten(), ref)
    y = fake_quant(xs[1], C8, amax=amax)  # broadcasts as the stored layout
    assert y.shape == xs[1].shape
    assert torch.equal(y, fake_quant(xs[1], C8, amax=ref))

    ax1 = QuantSpec(format="int8", granularity="channel", axis=1)  # e.g. conv [N, C, H, W]
    c = get_calibrator("max", ax1)
    x = torch.randn(2, 5, 3, 3)
    c.observe(x)
    assert torch.equal(c.compute()["amax"], x.abs().amax((0, 2, 3), keepdim=True))


def test_max_asymmetric():
    xs = [torch.rand(10, 16, generator=gen(i)) * 3 - 0.5 for i in range(3)]
    c = get_calibrator("max", A8)
    for x in xs:
        c.observe(x)
    s = c.compute()
    allx = torch.cat(xs)
    assert s["amax"] == allx.max() and s["amin"] == allx.min()
    ca = get_calibrator("max", QuantSpec(format="uint8", symmetric=False,
                                         granularity="channel", axis=-1))
    for x in xs:
        ca.observe(x)
    s = ca.compute()
    assert s["amax"].shape == s["amin"].shape == (1, 16)
    assert torch.equal(s["amin"][0], allx.amin(0)) and torch.equal(s["amax"][0], allx.amax(0))


# --- percentile ---------------------------------------------------------------------------------
def test_percentile_matches_quantile():
    x = torch.randn(400_000, generator=gen(1))
    for p in (99.0, 99.9, 99.99):
        c = get_calibrator("percentile", T8, percentile=p)
        for part in x.chunk(5):
            c.observe(part)
        ref = torch.quantile(x.abs()[:16_000_000], p / 100)
        width = float(c.bin_width()[0])
        assert width <= 2 * float(x.abs().max()) / 2048
        assert abs(float(c.compute()["amax"]) - float(ref)) <= width
    c = get_calibrator("percentile", T8, percentile=100)
    c.observe(x)
    assert c.compute()["amax"] == x.abs().max()


def test_percentile_per_channel_and_asymmetric():
    scale = torch.linspace(0.5, 4, 8)
    x = torch.randn(50_000, 8, generator=gen(2)) * scale
    c = get_calibrator("percentile", QuantSpec(format="int8", granularity="channel", axis=-1),
                       percentile=99.5)
    for part in x.chunk(3):
        c.observe(part)
    amax = c.compute()["amax"]
    assert amax.shape == (1, 8)
    ref = torch.quantile(x.abs(), 0.995, dim=0)
    assert torch.all((amax[0] - ref).abs() <= c.bin_width().float())

    # a channel axis that is not the last one ([N, C, L], axis 1) gives the same statistics
    x3 = x.reshape(-1, 10, 8).transpose(1, 2)  # [500, 8, 10]
    c1 = get_calibrator("percentile", QuantSpec(format="int8", granularity="channel", axis=1),
                        percentile=99.5)
    for part in x3.chunk(3):
        c1.observe(part)
    cl = get_calibrator("percentile", QuantSpec(format="int8", granularity="channel", axis=-1),
                        percentile=99.5)
    cl.observe(x3.transpose(1, 2))
    assert c1.compute()["amax"].shape == (1, 8, 1)
    assert torch.equal(c1.compute()["amax"].flatten(), cl.compute()["amax"].flatten())

    y = torch.randn(100_000, generator=gen(3)).exp()  # skewed, positive
    ca = get_calibrator("percentile", A8, percentile=99)
    ca.observe(y)
    s = ca.compute()
    w = float(ca.bin_width()[0])
    assert abs(float(s["amax"]) - float(torch.quantile(y, 0.99))) <= w
    assert abs(float(s["amin"]) - float(torch.quantile(y, 0.01))) <= w


def test_percentile_growing_range_equals_one_pass():
    g = gen(4)
    xs = [torch.randn(20_000, generator=g) * s for s in (0.01, 0.3, 1.0, 7.0, 50.0)]
    grow = get_calibrator("percentile", T8, percentile=99.9)
    for x in xs:  # the range grows 4 times: the counts are re-binned each time
        grow.observe(x)
    one = get_calibrator("percentile", T8, percentile=99.9)
    one.observe(torch.cat(xs))  # one pass, range known from the start
    assert torch.equal(grow.exp, one.exp) and torch.equal(grow.hist, one.hist)
    assert torch.equal(grow.compute()["amax"], one.compute()["amax"])
    # and the counts are those of a direct histogram over the final range
    allx = torch.cat(xs).abs()
    w = float(one.bin_width()[0])
    direct = torch.histc(allx, bins=2048, min=0, max=2048 * w)
    assert (direct - one.hist[0, 0].float()).abs().sum() <= 2  # histc edges: float rounding
    ref = torch.quantile(allx, 0.999)
    assert abs(float(grow.compute()["amax"]) - float(ref)) <= 2 * w


# --- mse and entropy: clipping heavy tails ---------------------------------------------------
def student_t2(shape, seed=0):
    """Student-t samples with 2 degrees of freedom (z / sqrt(chi2_2 / 2)), heavy tails."""
    g = gen(seed)
    z = torch.randn(shape, generator=g)
    return z / torch.rand(shape, generator=g).clamp_min(1e-12).log().neg().sqrt()


def test_mse_clips_outliers_and_reduces_error():
    t = student_t2(100_000)
    batches = [heavy_batches(), list(t.chunk(4))]
    for xs in batches:
        allx = torch.cat([x.flatten() for x in xs])
        mx = allx.abs().max()
        for spec in (T8, QuantSpec(format="int4"), QuantSpec(format="fp8_e4m3")):
            c = get_calibrator("mse", spec)
            for x in xs:
                c.observe(x)
            amax = c.compute()["amax"]
            assert amax.shape == () and amax <= mx
            assert mse(allx, amax, spec) <= mse(allx, mx, spec)
            if spec.format != "fp8_e4m3":  # integers: clipping the tail pays
                assert amax < mx and mse(allx, amax, spec) < mse(allx, mx, spec)
                # the histogram estimate finds (nearly) the best ratio of the real error
                real = [mse(allx, r * mx, spec) for r in c.ratios.tolist()]
                assert mse(allx, amax, spec) <= 1.02 * min(real)
    i4 = QuantSpec(format="int4")
    c = get_calibrator("mse", i4, start=0.05, steps=60)  # a wider grid clips further
    c.observe(t)
    amax = c.compute()["amax"]
    assert amax < 0.5 * t.abs().max()
    assert mse(t, amax, i4) <= 1.02 * min(mse(t, r * t.abs().max(), i4) for r in c.ratios)
    c = get_calibrator("mse", T8, ratios=[1.0])
    c.observe(t)
    assert c.compute()["amax"] == t.abs().max()


def test_mse_per_channel_and_asymmetric():
    x = student_t2((20_000, 8), seed=1) * torch.linspace(0.5, 4, 8)
    c = get_calibrator("mse", QuantSpec(format="int4", granularity="channel", axis=-1))
    for part in x.chunk(3):
        c.observe(part)
    amax = c.compute()["amax"]
    assert amax.shape == (1, 8)
    assert torch.all(amax[0] < x.abs().amax(0))
    ch = QuantSpec(format="int4", granularity="channel", axis=-1)
    assert mse(x, amax, ch) < mse(x, x.abs().amax(0), ch)

    y = torch.cat([torch.rand(50_000, generator=gen(5)) * 2 - 0.2, torch.tensor([30.0, -1.0])])
    ca = get_calibrator("mse", A8)
    ca.observe(y)
    s = ca.compute()
    assert -1.0 <= s["amin"] < 0 < s["amax"] < 30
    err = float(((fake_quant(y, A8, amax=s["amax"], amin=s["amin"]) - y) ** 2).mean())
    err_max = float(((fake_quant(y, A8, amax=y.max(), amin=y.min()) - y) ** 2).mean())
    assert err < err_max


def test_entropy_clips_outliers_int8():
    xs = heavy_batches()
    allx = torch.cat([x.flatten() for x in xs])
    c = get_calibrator("entropy", T8)
    for x in xs:
        c.observe(x)
    amax = c.compute()["amax"]
    assert amax.shape == ()
    assert torch.quantile(allx.abs(), 0.99) < amax < allx.abs().max()
    # per channel (optional): a threshold per channel, shape [1, 1, C]
    cc = get_calibrator("entropy", QuantSpec(format="int8", granularity="channel", axis=-1))
    for x in heavy_batches(hidden=3):
        cc.observe(x)
    assert cc.compute()["amax"].shape == (1, 1, 3)


def _kl_reference(h, i, levels, eps=1e-4):
    """Straight loop of the MXNet/TVM/TensorRT KL with smoothing, for one threshold."""
    h = np.asarray(h, dtype=np.float64)
    s = h[:i].copy()
    p = s.copy()
    p[-1] += h[i:].sum()
    m = i // levels
    q = np.zeros(i)
    for k in range(levels):
        a = k * m
        b = i if k == levels - 1 else a + m
        nz = (p[a:b] != 0).sum()
        if nz:
            q[a:b] = s[a:b].sum() / nz
    q[p == 0] = 0

    def smooth(d):
        z = d == 0
        return d + eps * z - eps * z.sum() / (~z).sum() * (~z)

    p, q = smooth(p), smooth(q)
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def test_kl_divergences_match_reference_loop():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_t(3, 20_000))
    h, _ = np.histogram(x, bins=300, range=(0, x.max() * 1.0001))
    h[200:250] = 0  # empty bins and a lone tail
    h[260:299] = 0
    cands = torch.arange(16, 301)
    kl = kl_divergences(torch.tensor(h, dtype=torch.float64)[None], cands, 16)[0]
    ref = np.array([_kl_reference(h, int(i), 16) for i in cands])
    np.testing.assert_allclose(kl.numpy(), ref, atol=1e-5)
    assert int(cands[kl.argmin()]) == int(cands[int(np.argmin(ref))])


# --- merging (distributed calibration) -----------------------------------------------------
SPECS = {"tensor": T8, "channel": C8, "asym": A8}


@pytest.mark.parametrize("name,kind", [(n, k) for n in NAMES for k in SPECS
                                       if not (n == "entropy" and k == "asym")])
def test_merge_two_halves_equals_all(name, kind):
    spec = SPECS[kind]
    xs = heavy_batches(n=4, hidden=4 if name == "entropy" else 16)
    xs[3] = xs[3] * 3  # the second half has the larger range: its grid is coarser
    one = get_calibrator(name, spec)
    for x in xs:
        one.observe(x)
    a, b, empty = get_calibrator(name, spec), get_calibrator(name, spec), \
        get_calibrator(name, spec)
    for x in xs[:2]:
        a.observe(x)
    for x in xs[2:]:
        b.observe(x)
    states = [a.state_dict(), empty.state_dict(), b.state_dict()]
    merged = type(a).merge_states(states)  # class call: returns the state only
    m = get_calibrator(name, spec)
    m.load_state_dict(merged)
    for k, v in one.state_dict().items():
        assert torch.equal(merged[k], v), k
    ref = one.compute()
    out = m.compute()
    assert out.keys() == ref.keys()
    for k in ref:
        assert torch.equal(out[k], ref[k])
    m2 = get_calibrator(name, spec)
    m2.merge_states(states)  # instance call: also loads it
    assert torch.equal(m2.compute()["amax"], ref["amax"])


class _ThreadDist:
    """Stand-in for ``torch.distributed`` collectives between threads (one per rank)."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots = {}
        self.local = threading.local()
        self.calls = []

    def get_backend(self, group=None):
        return "gloo"

    def all_reduce(self, tensor, op=None, group=None):
        import torch.distributed as dist

        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        vals = torch.stack([self.slots[r] for r in range(self.world)])
        if op == dist.ReduceOp.MAX:
            res = vals.amax(0)
        elif op == dist.ReduceOp.MIN:
            res = vals.amin(0)
        else:
            assert op in (None, dist.ReduceOp.SUM)
            res = vals.sum(0)
        if self.local.rank == 0:
            self.calls.append((tuple(tensor.shape), str(op)))
        self.barrier.wait()
        tensor.copy_(res)


def _observed(rank, i):
    return rank == 0 and i < 2 or rank == 1 and i >= 2  # rank 2 sees nothing


@pytest.mark.parametrize("kind", ["tensor", "channel", "asym"])
def test_all_reduce_protocol_equals_single_process(monkeypatch, kind):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    fake = _ThreadDist(3)
    monkeypatch.setattr(dist, "all_reduce", fake.all_reduce)
    monkeypatch.setattr(dist, "get_backend", fake.get_backend)
    spec = SPECS[kind]
    names = [n for n in NAMES if not (n == "entropy" and kind == "asym")]
    xs = [x * (i + 1) for i, x in enumerate(heavy_batches(n=4, hidden=4))]
    results, errors = {}, []

    def run(rank):
        fake.local.rank = rank
        try:
            for name in names:
                c = get_calibrator(name, spec)
                for i, x in enumerate(xs):
                    if _observed(rank, i):
                        c.observe(x)
                c.all_reduce()
                results[rank, name] = c.compute()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for name in names:
        one = get_calibrator(name, spec)
        for x in xs:
            one.observe(x)
        ref = one.compute()
        for r in range(3):
            assert results[r, name].keys() == ref.keys()
            for k in ref:
                assert torch.equal(results[r, name][k], ref[k]), (name, r, k)


def test_all_reduce_real_gloo_single_rank():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed is not available or already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for name in NAMES:
            c = get_calibrator(name, C8)
            for x in heavy_batches(n=2, hidden=4):
                c.observe(x)
            ref = c.compute()["amax"]
            c.all_reduce()
            assert torch.equal(c.compute()["amax"], ref)
        empty = get_calibrator("max", C8)
        empty.all_reduce()  # no rank saw data: still no data
        with pytest.raises(CalibrationError, match="saw no data"):
            empty.compute()
    finally:
        dist.destroy_process_group()
