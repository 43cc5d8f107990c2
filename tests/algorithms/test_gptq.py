"""GPTQ on one linear layer: better than round-to-nearest, exactly on its grid, robust."""

import pytest
import torch

from lowbit.algorithms import GPTQResult, HessianAccumulator, gptq_quantize_weight
from lowbit.core import Layout, QuantSpec, dequantize, fake_quant, quantize
from lowbit.errors import CalibrationError, ConfigError

BEATS_RTN = [
    QuantSpec(format="int4", granularity="group", group_size=32),
    QuantSpec(format="int4", granularity="group", group_size=32, symmetric=False),
    QuantSpec(format="int3", granularity="channel"),
    QuantSpec(format="int3", granularity="group", group_size=32, symmetric=False),
    QuantSpec(format="nvfp4"), QuantSpec(format="mxfp4"),
    QuantSpec(format="fp8_e4m3", granularity="channel"),
    QuantSpec(format="int8"),
]

# every element format and granularity GPTQ must land exactly on the grid of
EXACT = [QuantSpec(format=f"int{b}", granularity="group", group_size=16, symmetric=sym)
         for b in range(2, 9) for sym in (True, False)] + [
    QuantSpec(format="int2", granularity="channel", symmetric=False),
    QuantSpec(format="int8", granularity="channel"),
    QuantSpec(format="int4", granularity="tensor", symmetric=False),
    QuantSpec(format="int4", granularity="group", group_size=16, narrow_range=True),
    QuantSpec(format="int4", granularity="group", group_size=16, sym_scale="qmax"),
    QuantSpec(format="int4", granularity="group", group_size=16, scale_format="bf16"),
    QuantSpec(format="fp8_e4m3"), QuantSpec(format="fp8_e4m3", granularity="channel"),
    QuantSpec(format="fp8_e5m2"), QuantSpec(format="fp8_e5m2", granularity="channel"),
    QuantSpec(format="fp8_e4m3", granularity="block", block=(16, 16)),
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=16, scale_format="e4m3"),
    QuantSpec(format="nvfp4"), QuantSpec(format="mxfp4"), QuantSpec(format="mxfp6_e3m2"),
    QuantSpec(format="mxfp6_e2m3"), QuantSpec(format="mxfp8_e4m3"),
    QuantSpec(format="mxfp8_e5m2"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: one thread avoids OpenMP spin-waits on a shared, busy CPU (4x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _hessian(x):
    return (2 / x.shape[0] * x.double().T @ x.double()).float()


@pytest.fixture(scope="module")
def layer():
    """A linear layer whose inputs are correlated, with a few high-variance directions."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out, n = 128, 64, 2048
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5
    z = torch.randn(n, n_in, generator=g)
    z[:, :4] *= 10
    x = z @ mix
    w = torch.randn(n_out, n_in, generator=g)
    acc = HessianAccumulator(n_in)
    for part in x.split(500):
        acc.add(part)
    return w, x, acc.H


@pytest.fixture(scope="module")
def small():
    """[16, 64] weight with an outlier and a well-conditioned correlated Hessian."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64,
                                                                              generator=g))
    w = torch.randn(16, 64, generator=g)
    w[3, 7] = 9.0
    return w, _hessian(x)


def _out_err(q, w, x):
    return float(((q - w) @ x.T).norm())


# --- HessianAccumulator --------------------------------------------------------------------

def test_hessian_accumulator_matches_direct_and_merges():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 250, 48, generator=g)  # [batch, tokens, in]
    flat = x.reshape(-1, 48).double()
    ref = 2 / flat.shape[0] * flat.T @ flat
    acc = HessianAccumulator(48)
    acc.add(x[:1])  # running average over uneven batches, 3-D inputs
    acc.add(x[1:, :10])
    acc.add(x[1:, 10:])
    assert acc.n_tokens == 1000 and acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), ref, rtol=1e-5, atol=1e-6)
    # two halves (two "processes") merged == one pass; the state is sum(2 x x^T) and N
    a, b = HessianAccumulator(48), HessianAccumulator(48)
    a.add(x[:1])
    a.add(x[1:2, :100])
    b.add(x[1:2, 100:])
    b.add(x[2:])
    sa, sb = a.state_dict(), b.state_dict()
    torch.testing.assert_close(sa["sum"].double(), 2 * flat[:350].T @ flat[:350], rtol=1e-5,
                               atol=1e-4)
    merged = HessianAccumulator(48)
    merged.load_state_dict({"sum": sa["sum"] + sb["sum"], "n": sa["n"] + sb["n"]})
    assert merged.n_tokens == 1000
    torch.testing.assert_close(merged.H, acc.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.merge(b).H, acc.H, rtol=1e-5, atol=1e-6)


def test_hessian_accumulator_float64_and_low_precision_inputs():
    x = torch.randn(300, 16)
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add(x.bfloat16())
    xb = x.bfloat16().double()
    assert acc.H.dtype == torch.float64
    torch.testing.assert_close(acc.H, 2 / 300 * xb.T @ xb, rtol=1e-12, atol=1e-12)
    acc.add(torch.empty(0, 16))
    assert acc.n_tokens == 300
    with pytest.raises(CalibrationError, match="expected 16"):
        acc.add(torch.randn(3, 17))


# --- quality -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", BEATS_RTN, ids=lambda s: s.short())
@pytest.mark.parametrize("mode", ["natural", "act_order", "act_order_dynamic"])
def test_beats_rtn_and_is_exact_on_its_grid(layer, spec, mode):
    w, x, H = layer
    r = gptq_quantize_weight(w, H, spec, act_order=mode != "natural",
                             static_groups=mode != "act_order_dynamic")
    assert isinstance(r, GPTQResult) and r.weight.dtype == torch.float32
    again = fake_quant(r.weight, spec, scale=r.scale, zero_point=r.zero_point,
                       global_scale=r.global_scale)
    assert torch.equal(again, r.weight)
    assert _out_err(r.weight, w, x) < 0.75 * _out_err(fake_quant(w, spec), w, x)
    assert r.loss > 0 and r.damp == pytest.approx(0.01 * float(torch.diag(H).mean()))


def test_exact_on_its_grid_for_every_format(small):
    """fake_quant with the returned scales reproduces the weight bit for bit, and the
    scales have the stored layout (so quantize/dequantize with them, the export path, too)."""
    w, H = small
    for spec in EXACT:
        grouped = spec.granularity == "group"
        modes = [(False, True), (True, True)] + ([(True, False)] if grouped else [])
        for act_order, static in modes:
            what = (spec.short(), act_order, static)
            r = gptq_quantize_weight(w, H, spec, act_order=act_order, static_groups=static,
                                     block_size=24)
            assert torch.isfinite(r.weight).all(), what
            assert tuple(r.scale.shape) == Layout(spec, w.shape).natural_shape(), what
            assert (r.zero_point is None) == spec.symmetric, what
            if r.zero_point is not None:
                assert r.zero_point.dtype == torch.int32
                assert r.zero_point.shape == r.scale.shape
            assert (r.global_scale is not None) == (spec.format == "nvfp4"), what
            kw = dict(scale=r.scale, zero_point=r.zero_point, global_scale=r.global_scale)
            assert torch.equal(fake_quant(r.weight, spec, **kw), r.weight), what
            assert torch.equal(dequantize(quantize(r.weight, spec, **kw)), r.weight), what


def test_nvfp4_global_scale_from_whole_weight(small):
    w, H = small
    spec = QuantSpec(format="nvfp4")
    r = gptq_quantize_weight(w, H, spec)
    assert torch.equal(r.global_scale, quantize(w, spec).global_scale)


def test_low_precision_weight_input(small):
    w, H = small
    spec = QuantSpec(format="int4", granularity="group", group_size=16)
    r = gptq_quantize_weight(w.bfloat16(), H.double(), spec)
    assert r.weight.dtype == torch.float32
    assert torch.equal(fake_quant(r.weight, spec, scale=r.scale), r.weight)


# --- group scales --------------------------------------------------------------------------

def test_group_scales_follow_the_sweep(layer):
    """Natural order: group 0's scales are RTN's (nothing compensated yet), later groups' come
    from the error-compensated weights; static_groups only matters with act_order."""
    w, x, H = layer
    spec = QuantSpec(format="int4", granularity="group", group_size=32)
    rtn = quantize(w, spec).scale
    r = gptq_quantize_weight(w, H, spec)
    assert torch.equal(r.scale[:, 0], rtn[:, 0])
    assert not torch.equal(r.scale[:, 1:], rtn[:, 1:])
    r2 = gptq_quantize_weight(w, H, spec, static_groups=False)
    assert torch.equal(r.weight, r2.weight) and torch.equal(r.scale, r2.scale)
    # act_order + static groups: every scale from the original weights, natural layout
    ra = gptq_quantize_weight(w, H, spec, act_order=True)
    assert torch.equal(ra.scale, rtn)
    rd = gptq_quantize_weight(w, H, spec, act_order=True, static_groups=False)
    assert not torch.equal(rd.scale, rtn)


def test_lazy_blocks_match_the_eager_sweep(layer):
    """Groups that straddle lazy blocks get their scales from weights that include the block's
    pending updates: block sizes 24 and 128 give the codes of the eager sweep (block size 1),
    with scales equal up to float rounding."""
    w, x, H = layer
    for spec, act_order in [(QuantSpec(format="int4", granularity="group", group_size=32,
                                       symmetric=False), False),
                            (QuantSpec(format="nvfp4"), True)]:
        eager = gptq_quantize_weight(w, H, spec, block_size=1, act_order=act_order,
                                     static_groups=False)
        for bs in (128, 24):
            lazy = gptq_quantize_weight(w, H, spec, block_size=bs, act_order=act_order,
                                        static_groups=False)
            codes = [quantize(r.weight, spec, scale=r.scale, zero_point=r.zero_point,
                              global_scale=r.global_scale).codes for r in (lazy, eager)]
            assert torch.equal(codes[0], codes[1]), (spec.short(), bs)
            torch.testing.assert_close(lazy.scale, eager.scale, rtol=1e-5, atol=0)
            torch.testing.assert_close(lazy.weight, eager.weight, rtol=1e-5, atol=1e-6)
            if spec.symmetric is False:
                assert torch.equal(lazy.zero_point, eager.zero_point)


# --- act-order -----------------------------------------------------------------------------

def test_act_order_permutation_and_restore(layer):
    w, x, H = layer
    spec = QuantSpec(format="int4", granularity="channel")
    r = gptq_quantize_weight(w, H, spec, act_order=True)
    d = torch.diag(H)
    assert torch.equal(torch.sort(r.perm).values, torch.arange(w.shape[1]))
    assert bool((d[r.perm][:-1] >= d[r.perm][1:]).all())
    # act-order == plain GPTQ of the permuted problem, un-permuted (bit for bit)
    p = r.perm
    manual = gptq_quantize_weight(w[:, p], H[p][:, p], spec)
    assert torch.equal(r.weight, manual.weight[:, torch.argsort(p)])
    assert torch.equal(r.scale, manual.scale)
    assert r.loss == manual.loss


@pytest.mark.parametrize("static_groups", [True, False])
def test_act_order_with_diagonal_hessian_is_rtn_in_natural_order(layer, static_groups):
    """A diagonal H spreads no error: GPTQ == RTN bit for bit, which only holds if the columns
    come back in their natural order with their natural groups."""
    w, x, _ = layer
    spec = QuantSpec(format="int4", granularity="group", group_size=32, symmetric=False)
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) + 0.5)
    r = gptq_quantize_weight(w, h, spec, act_order=True, static_groups=static_groups,
                             percdamp=0.0)
    assert not torch.equal(r.perm, torch.arange(w.shape[1]))
    rtn = quantize(w, spec)
    assert torch.equal(r.weight, fake_quant(w, spec))
    assert torch.equal(r.scale, rtn.scale) and torch.equal(r.zero_point, rtn.zero_point)
    # loss = sum (w - q)^2 / d^2 with d = Hinv_chol[i, i] = 1 / sqrt(H_ii)
    ref = float(((w - r.weight).double().square() * torch.diag(h).double()).sum())
    assert r.loss == pytest.approx(ref, rel=1e-5)
    # equal diagonal entries: the stable order is the natural one, same as without act-order
    r1 = gptq_quantize_weight(w, 2 * torch.eye(w.shape[1]), spec, act_order=True)
    r0 = gptq_quantize_weight(w, 2 * torch.eye(w.shape[1]), spec)
    assert torch.equal(r1.perm, torch.arange(w.shape[1]))
    assert torch.equal(r1.weight, r0.weight) and torch.equal(r0.weight, fake_quant(w, spec))


# --- robustness ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["negative_definite", "rank_deficient"])
def test_failed_cholesky_raises_damping_with_a_warning(kind):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    h = -torch.eye(32) if kind == "negative_definite" else 2 * torch.ones(32, 32)
    spec = QuantSpec(format="int4", granularity="group", group_size=16)
    with pytest.warns(RuntimeWarning, match="Cholesky") as rec:
        r = gptq_quantize_weight(w, h, spec, percdamp=0.0)
    assert torch.isfinite(r.weight).all() and r.damp > 0
    assert len(rec) == (4 if kind == "negative_definite" else 1)  # 0, .01, .1, 1 -> 10
    assert torch.equal(fake_quant(r.weight, spec, scale=r.scale), r.weight)


def test_hopeless_hessian_raises_calibration_error():
    w = torch.randn(8, 16)
    spec = QuantSpec(format="int8", granularity="channel")
    with pytest.warns(RuntimeWarning), pytest.raises(CalibrationError,
                                                     match="q_proj.*not positive definite"):
        gptq_quantize_weight(w, -torch.eye(16), spec, max_retries=1, name="q_proj")
    h = torch.eye(16)
    h[2, 3] = float("nan")
    with pytest.raises(CalibrationError, match="NaN"):
        gptq_quantize_weight(w, h, spec)
    with pytest.raises(CalibrationError, match=r"expected \[16, 16\]"):
        gptq_quantize_weight(w, torch.eye(15), spec)
    with pytest.raises(ConfigError, match="does not divide"):
        gptq_quantize_weight(w, torch.eye(16), QuantSpec(format="int4", granularity="group",
                                                         group_size=5))


@pytest.mark.parametrize("spec", [QuantSpec(format="int8", granularity="channel"),
                                  QuantSpec(format="int4", granularity="group", group_size=8,
                                            symmetric=False),
                                  QuantSpec(format="nvfp4")], ids=lambda s: s.short())
@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs(spec, act_order):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 32, generator=g) @ (torch.eye(32) + 0.2 * torch.randn(32, 32,
                                                                              generator=g))
    x[:, [5, 20]] = 0
    w = torch.randn(8, 32, generator=g)
    h = _hessian(x)
    r = gptq_quantize_weight(w, h, spec, act_order=act_order)
    assert bool((r.weight[:, [5, 20]] == 0).all())
    assert torch.isfinite(r.weight).all()
    kw = dict(scale=r.scale, zero_point=r.zero_point, global_scale=r.global_scale)
    assert torch.equal(fake_quant(r.weight, spec, **kw), r.weight)
    assert _out_err(r.weight, w, x) < _out_err(fake_quant(w, spec), w, x)


@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("batch", [True, False])
def test_shared_hessians_change_nothing(monkeypatch, true_sequential, batch):
    # q/k/v and gate/up read the same tensor: one Hessian each, copied, or their rows
    # stacked into one GPTQ call (batch); the quantized weights and scales equal those of
    # separate accumulation and separate calls bit for bit
    import lowbit
    from lowbit.algorithms import steps
    from tests.tiny_models import build, calib_ids, loop_over

    def run(share):
        monkeypatch.setattr(steps, "SHARE_HESSIANS", share)
        monkeypatch.setattr(steps, "BATCH_SHARED", share and batch)
        m = build("llama")
        d = lowbit.recipes.load("int4-gptq", group_size=16).to_dict()
        for a in d["algorithms"]:
            a.setdefault("args", {})["true_sequential"] = true_sequential
        lowbit.quantize(m, lowbit.recipes.load(d), forward_loop=loop_over(calib_ids(3, 16)))
        return {n: (p.weight.detach().clone(), p.weight_quantizer.scale.clone())
                for n, p in m.named_modules() if hasattr(p, "weight_quantizer")}

    calls = []
    orig = steps.HessianAccumulator.add
    monkeypatch.setattr(steps.HessianAccumulator, "add",
                        lambda self, x: (calls.append(1), orig(self, x))[1])
    shared = run(True)
    n_shared = len(calls)
    calls.clear()
    separate = run(False)
    assert n_shared < len(calls)  # fewer accumulations ...
    assert shared.keys() == separate.keys() and len(shared) == 14
    for n in shared:  # ... the same result
        assert torch.equal(shared[n][0], separate[n][0]), n
        assert torch.equal(shared[n][1], separate[n][1]), n


def test_bfloat16_forward_passes_stay_close():
    # Hessian passes under bfloat16 autocast: the quantized model's output error stays that
    # of float32 passes (their choices differ in places: the inputs went through bfloat16)
    import lowbit
    from tests.tiny_models import build, calib_ids, loop_over

    ids = calib_ids(4, 16, seed=7)
    ref = build("llama")
    with torch.no_grad():
        y = ref(ids).logits

    def run(fd):
        m = build("llama")
        d = lowbit.recipes.load("int4-gptq", group_size=16).to_dict()
        d["algorithms"][0].setdefault("args", {})["forward_dtype"] = fd
        lowbit.quantize(m, lowbit.recipes.load(d), forward_loop=loop_over(calib_ids(3, 16)))
        with torch.no_grad():
            err = float((m(ids).logits - y).norm() / y.norm())
        return err, [p.weight.detach().clone() for p in m.modules()
                     if hasattr(p, "weight_quantizer")]

    (ea, wa), (eb, wb) = run("float32"), run("bfloat16")
    assert any(not torch.equal(p, q) for p, q in zip(wa, wb))  # the passes did change
    assert eb <= 1.25 * ea, (ea, eb)
    with pytest.raises(ConfigError, match="forward_dtype"):
        run("float16")


@pytest.mark.parametrize("spec", [
    QuantSpec(format="int4", granularity="group", group_size=32),
    QuantSpec(format="int4", granularity="group", group_size=32, symmetric=False),
    QuantSpec(format="int8", granularity="channel"),
    QuantSpec(format="mxfp4"),
])
def test_stacked_rows_equal_separate_calls(spec):
    # linears sharing a Hessian are solved in one call with their rows stacked: each gets
    # what it would alone (weights, scales, zero points, loss per row)
    from lowbit.algorithms.gptq import rows_separable

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 128, generator=g) * torch.rand(128, generator=g) * 3
    h = _hessian(x)
    ws = [torch.randn(n, 128, generator=g) for n in (48, 16, 40)]
    assert rows_separable(spec, (48, 128))
    whole = gptq_quantize_weight(torch.cat(ws), h, spec)
    r0 = 0
    for w in ws:
        one = gptq_quantize_weight(w, h, spec)
        rows = slice(r0, r0 + w.shape[0])
        r0 += w.shape[0]
        assert torch.equal(whole.weight[rows], one.weight)
        assert torch.equal(whole.scale[rows], one.scale)
        if one.zero_point is not None:
            assert torch.equal(whole.zero_point[rows], one.zero_point)
        assert torch.allclose(whole.row_loss[rows], one.row_loss)
    assert whole.loss == pytest.approx(float(whole.row_loss.sum()))


@pytest.mark.parametrize("spec", [QuantSpec(format="nvfp4"),
                                  QuantSpec(format="int4", granularity="tensor"),
                                  QuantSpec(format="gguf_q4_0")])
def test_rows_not_separable(spec):
    from lowbit.algorithms.gptq import rows_separable
    assert not rows_separable(spec, (64, 256))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_memoized_passes_change_nothing(monkeypatch, family):
    # the passes after a group is quantized reuse its linears' outputs per chunk: the
    # quantized model is the one without reuse, bit for bit, and outputs were reused
    import lowbit
    from lowbit.pipeline.blocks import BlockContext
    from tests.tiny_models import build, calib_ids, loop_over

    def run(mb):
        monkeypatch.setattr(BlockContext, "memo_mb", mb)
        m = build(family)
        attn = type(m.model.layers[0].self_attn)
        calls = []
        orig = attn.forward
        monkeypatch.setattr(attn, "forward", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
        lowbit.quantize(m, lowbit.recipes.load("int4-gptq", group_size=16),
                        forward_loop=loop_over(calib_ids(6, 16)), chunk_size=2)
        monkeypatch.setattr(attn, "forward", orig)
        ws = {n: p.weight.detach().clone() for n, p in m.named_modules()
              if hasattr(p, "weight_quantizer")}
        return ws, [b.get("memo_hits", 0) for b in m.lowbit_report.blocks], m, len(calls)

    memo, hits, m, n_memo = run(2048)
    plain, none, _, n_plain = run(0)
    assert memo.keys() == plain.keys()
    for n in memo:
        assert torch.equal(memo[n], plain[n]), n
    assert sum(none) == 0 and all(h > 0 for h in hits[:-1])  # the last block feeds nothing
    assert n_memo < n_plain  # whole attention modules reused once q/k/v/o are final
    assert all("forward" not in mod.__dict__ for mod in m.modules())  # forwards restored


def test_memo_recomputes_what_changed():
    # a kept output is reused only for the same chunk, input values, weight and quantizer
    # state, and only while nobody modified it in place
    import torch.nn as nn

    from lowbit.nn.modules import QuantLinear
    from lowbit.pipeline.blocks import BlockContext

    lin = QuantLinear(8, 4)
    lin._init_quantizers(QuantSpec(format="int4", granularity="channel"), None, None, "lin")
    ctx = BlockContext(None, nn.Sequential(lin), "b", 0, None, [], None)
    ctx.memoize(["0"])
    calls = []
    orig = QuantLinear.forward
    x = torch.randn(3, 8)
    try:
        torch.set_grad_enabled(False)  # (outputs that need a gradient are never kept)
        QuantLinear.forward = lambda self, x: (calls.append(1), orig(self, x))[1]
        ctx._chunk = 0
        y = lin(x)
        assert lin(x.clone()) is y and len(calls) == 1  # same values: reused
        y.add_(1)  # modified in place downstream: recomputed
        y2 = lin(x)
        assert len(calls) == 2 and torch.equal(y2, orig(lin, x))
        lin(x + 1)  # other input
        assert len(calls) == 3
        lin.weight.mul_(2)  # weight changed
        lin(x + 1)
        assert len(calls) == 4
        ctx._chunk = 1  # another chunk
        lin(x + 1)
        ctx._chunk = None  # not a pass over the block's chunks: never kept
        lin(x + 1)
        lin(x + 1)
        assert len(calls) == 7
    finally:
        torch.set_grad_enabled(True)
        QuantLinear.forward = orig
        ctx.end_memo()
    assert "forward" not in lin.__dict__
