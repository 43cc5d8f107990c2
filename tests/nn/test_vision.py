"""Vision nets: nn.MultiheadAttention and Linear subclasses quantized, coverage of CNNs/ViTs.

The small models of tests/vision_models.py always run; torchvision's (ResNet-18,
MobileNetV3, VisionTransformer, ViT-B/16 as ``slow``) skip without torchvision.
"""

import copy
import time

import pytest
import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import lowbit
from lowbit.config.recipe import Recipe
from lowbit.core import QuantSpec, fake_quant
from lowbit.errors import ConfigError
from lowbit.nn import apply_recipe, quantize_module
from lowbit.nn.mha import QuantMultiheadAttention
from lowbit.nn.modules import QuantLinear
from tests.vision_models import (TV_SIZES, SmallBNCNN, TinyViT, calib_loop, images,
                                 tv_model)

I8 = QuantSpec(format="int8", granularity="tensor")
I8_CH = QuantSpec(format="int8", granularity="channel")
FP8 = QuantSpec(format="fp8_e4m3", granularity="tensor")


def _recipe(weight, input=None, exclude=()):
    t = {"pattern": "*", "weight": weight}
    if input:
        t["input"] = input
    return Recipe.model_validate({"name": "t", "targets": [t], "exclude": list(exclude)})


# --- Linear subclasses ----------------------------------------------------------------------
def test_linear_subclass_is_quantized_and_keeps_its_class():
    m = nn.Sequential(NonDynamicallyQuantizableLinear(16, 8))
    x = torch.randn(3, 16)
    report = apply_recipe(m, _recipe({"format": "int8", "granularity": "channel"}))
    q = m[0]
    assert isinstance(q, QuantLinear) and isinstance(q, NonDynamicallyQuantizableLinear)
    assert type(q).__name__ == "QuantNonDynamicallyQuantizableLinear"
    assert report.coverage.share == 1.0
    want = x @ fake_quant(q.weight, I8_CH.model_copy(update={"axis": 0})).T + q.bias
    assert torch.allclose(q(x), want, atol=1e-6)
    assert not torch.allclose(q(x), nn.functional.linear(x, q.weight, q.bias), atol=1e-5)


def test_linear_subclass_overriding_forward_is_left_float_with_a_reason():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    m = nn.Sequential(Scaled(16, 8), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="Linear subclass Scaled overrides forward"):
        report = apply_recipe(m, _recipe({"format": "int8", "granularity": "channel"}))
    assert type(m[0]) is Scaled
    (u,) = report.coverage.unquantized
    assert u.kind == "unsupported" and "overrides forward" in u.reason


# --- nn.MultiheadAttention ------------------------------------------------------------------
def _mha(batch_first=True, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.MultiheadAttention(32, 4, batch_first=batch_first, bias=bias).eval()


CASES = {
    "self": dict(),
    "self-weights-per-head": dict(need_weights=True, average_attn_weights=False),
    "no-weights": dict(need_weights=False),
    "bool-mask": dict(attn_mask="causal-bool"),
    "float-mask-causal-hint": dict(attn_mask="causal-float", is_causal=True,
                                   need_weights=False),
    "3d-mask": dict(attn_mask="3d"),
    "padding": dict(key_padding_mask=True),
    "padding-and-mask": dict(key_padding_mask=True, attn_mask="causal-bool",
                             need_weights=False),
    "cross": dict(cross=True),
}


def _inputs(case, batch_first, batched=True, n=2, tgt=5, src=5, e=32, h=4):
    g = torch.Generator().manual_seed(1)
    kw = dict(CASES[case])
    cross = kw.pop("cross", False)
    src = 7 if cross else tgt
    shape = (n, tgt, e) if batch_first else (tgt, n, e)
    q = torch.randn(shape, generator=g)
    if not batched:
        q = q[0] if batch_first else q[:, 0]
    if cross:
        kv_shape = (n, src, e) if batch_first else (src, n, e)
        k = torch.randn(kv_shape, generator=g)
        if not batched:
            k = k[0] if batch_first else k[:, 0]
        args = (q, k, k.flip(-1))
    else:
        args = (q, q, q)
    mask = kw.get("attn_mask")
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    if mask == "causal-bool":
        kw["attn_mask"] = causal
    elif mask == "causal-float":
        kw["attn_mask"] = torch.zeros(tgt, src).masked_fill(causal, float("-inf"))
    elif mask == "3d":
        kw["attn_mask"] = torch.rand(n * h, tgt, src, generator=g) > 0.7
        kw["attn_mask"][..., 0] = False
    if kw.get("key_padding_mask"):
        kpm = torch.zeros(n, src, dtype=torch.bool)
        kpm[0, -2:] = True
        kw["key_padding_mask"] = kpm if batched else kpm[0]
    return args, kw


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_quant_mha_with_quantizers_off_equals_torch(case, batch_first):
    ref = _mha(batch_first)
    q = quantize_module(copy.deepcopy(ref), None, None, None, "attn")  # quantizers off
    args, kw = _inputs(case, batch_first)
    want, want_w = ref(*args, **kw)
    got, got_w = q(*args, **kw)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (want_w is None) == (got_w is None)
    if want_w is not None:
        assert torch.allclose(got_w, want_w, atol=1e-6)
    with torch.no_grad():  # torch's inference fast path (self-attention, no weights)
        fast, _ = ref(*args, **kw)
        assert torch.allclose(q(*args, **kw)[0], fast, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_quant_mha_unbatched_and_no_bias(batch_first):
    ref = _mha(batch_first, bias=False)
    q = quantize_module(copy.deepcopy(ref), None, None, None, "attn")
    for case in ("self", "padding", "cross"):
        args, kw = _inputs(case, batch_first, batched=False)
        want, want_w = ref(*args, **kw)
        got, got_w = q(*args, **kw)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(got_w, want_w, atol=1e-6)


def test_quant_mha_is_causal_without_mask_is_refused_like_torch():
    q = quantize_module(_mha(), None, None, None, "attn")
    x = torch.randn(2, 5, 32)
    with pytest.raises(RuntimeError, match="is_causal"):
        q(x, x, x, is_causal=True)


@pytest.mark.parametrize("spec", [I8, FP8, I8_CH], ids=lambda s: s.short())
def test_in_proj_weight_is_quantized_per_qkv_part(spec):
    m = _mha()
    with torch.no_grad():
        m.in_proj_weight[32:64] *= 8  # k's range far from q's and v's
    w = m.in_proj_weight.detach().clone()
    quantize_module(m, spec, None, None, "attn")
    got = m.quantized_weight()
    if spec.granularity == "tensor":
        want = torch.cat([fake_quant(p, spec) for p in w.chunk(3)])
        assert "per q/k/v part" in m.weight_quantizer.note
        assert not torch.equal(got, fake_quant(w, spec))  # one scale would differ
    else:
        want = fake_quant(w, spec.model_copy(update={"axis": 0}))
    assert torch.equal(got, want)


def test_mha_block_rows_must_divide_the_width():
    spec = QuantSpec(format="int8", granularity="block", block=(24, 32))
    with pytest.raises(ConfigError, match="block rows 24 do not divide the attention width 32"):
        quantize_module(_mha(), spec, None, None, "attn")


def test_tiny_vit_int8_quantizes_mha_and_out_proj():
    model = TinyViT().eval()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
    lowbit.quantize(model, "int8", forward_loop=calib_loop())
    attn = model.blocks[0].attn
    assert isinstance(attn, QuantMultiheadAttention)
    assert type(attn.out_proj).__name__ == "QuantNonDynamicallyQuantizableLinear"
    assert attn.input_quantizer.amax is not None  # calibrated
    assert attn.out_proj.input_quantizer.amax is not None  # called by the quantized forward
    cov = model.lowbit_report.coverage
    assert cov.body_share >= 0.99, cov.line()
    assert not [u for u in cov.unquantized if u.kind == "unsupported"]
    assert "blocks.0.attn.in_proj_weight" not in {u.name for u in cov.unquantized}
    with torch.no_grad():
        y = model(x)
    err = (y - ref).abs().max()
    assert 0 < err < 0.05 * ref.abs().max(), err


def test_out_proj_alone_is_applied_through_the_attention_module():
    model = TinyViT().eval()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
    report = apply_recipe(model, _recipe({"format": "int4", "granularity": "channel"},
                                         exclude=["*.attn", "*mlp*", "patch", "head"]))
    attn = model.blocks[0].attn
    assert isinstance(attn, QuantMultiheadAttention) and not attn.weight_quantizer.is_enabled
    assert attn.out_proj.weight_quantizer.is_enabled
    assert "blocks.0.attn.out_proj" in report.quantized
    with torch.no_grad():
        assert not torch.allclose(model(x), ref, atol=1e-4)  # int4 out_proj took effect


def test_unsupported_mha_is_named_and_its_out_proj_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)

    with pytest.raises(ConfigError, match="kdim/vdim differ from embed_dim"):
        apply_recipe(M(), _recipe({"format": "int8", "granularity": "channel"}))
    m = M()
    report = apply_recipe(m, _recipe({"format": "int8", "granularity": "channel"},
                                     exclude=["attn.out_proj"]))
    reasons = {u.name: u.reason for u in report.coverage.unquantized}
    assert "kdim/vdim" in reasons["attn.q_proj_weight"]


# --- CNNs: BatchNorm and depthwise convolutions ----------------------------------------------
@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_small_bn_cnn_is_fully_covered(recipe):
    model = SmallBNCNN().eval()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
    lowbit.quantize(model, recipe, forward_loop=calib_loop())
    assert model.lowbit_report.coverage.share == 1.0
    assert model.dw[0].weight_quantizer.is_enabled  # the depthwise conv
    assert isinstance(model.stem[1], nn.BatchNorm2d)  # BatchNorm stays as it is (not folded)
    with torch.no_grad():
        err = (model(x) - ref).abs().max()
    assert 0 < err < 0.1 * ref.abs().max()


# --- torchvision ------------------------------------------------------------------------------
def _coverage(name, recipe="int8"):
    model = tv_model(name)
    size = TV_SIZES[name]
    t = time.perf_counter()
    lowbit.quantize(model, recipe, forward_loop=calib_loop(size, batches=1))
    cov = model.lowbit_report.coverage
    print(f"\n{name} {recipe}: {cov.line()} ({time.perf_counter() - t:.1f} s)")
    return model, cov


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "mobilenet_v3_large",
                                  "vit_small"])
def test_torchvision_int8_coverage(name):
    model, cov = _coverage(name)
    assert cov.body_share >= 0.99, cov.line()
    assert cov.share >= 0.99 or name.startswith("vit"), cov.line()
    assert not [u for u in cov.unquantized if u.kind == "unsupported"]
    if name == "vit_small":
        attn = model.encoder.layers[0].self_attention
        assert isinstance(attn, QuantMultiheadAttention)
        assert attn.out_proj.weight_quantizer.is_enabled


def test_torchvision_vit_fp8_runs_with_per_part_scales():
    model, cov = _coverage("vit_small", "fp8")
    assert cov.body_share >= 0.99
    attn = model.encoder.layers[0].self_attention
    assert attn.weight_quantizer.spec.granularity == "block"
    with torch.no_grad():
        assert torch.isfinite(model(images(2, 32))).all()


@pytest.mark.slow
def test_vit_b_16_int8_coverage():
    model, cov = _coverage("vit_b_16")
    assert cov.body_share >= 0.99 and cov.share >= 0.99, cov.line()
    attn = model.encoder.layers[11].self_attention
    assert isinstance(attn, QuantMultiheadAttention) and attn.input_quantizer.amax is not None


def test_quantized_vit_pickles_and_deep_copies():
    """torch.save(model) pickles classes by name: the Linear-subclass class made at run time
    pickles through its base class (and is made again when unpickled)."""
    import pickle

    model = TinyViT().eval()
    lowbit.quantize(model, "int8", forward_loop=calib_loop())
    x = images(2)
    with torch.no_grad():
        want = model(x)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            out_proj = other.blocks[0].attn.out_proj
            assert type(out_proj).__name__ == "QuantNonDynamicallyQuantizableLinear"
            assert torch.equal(other(x), want)


# --- BatchNorm folding ------------------------------------------------------------------------
def test_fold_batchnorm_small_cnn_then_quantize():
    from lowbit.nn.fold import fold_batchnorm

    model = SmallBNCNN().eval()
    x = images(2)
    with torch.no_grad():
        ref = model(x)
    pairs = fold_batchnorm(model, (x,))
    assert pairs == [("stem.0", "stem.1"), ("dw.0", "dw.1"), ("pw.0", "pw.1")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)
    lowbit.quantize(model, "int8", forward_loop=calib_loop())
    assert model.lowbit_report.coverage.share == 1.0
    assert model.dw[0].bias is not None  # the folded shift


def test_fold_batchnorm_refuses_what_it_cannot_fold_and_leaves_the_model():
    from lowbit.nn.fold import fold_batchnorm

    class Tapped(nn.Module):  # the conv output is also used by functional code
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            with torch.no_grad():
                self.bn.running_var.fill_(4.0)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Tapped().eval()
    w = model.conv.weight.detach().clone()
    with pytest.raises(ConfigError, match="also used elsewhere.*unchanged"):
        fold_batchnorm(model, images(1))
    assert torch.equal(model.conv.weight, w) and model.conv.bias is not None
    assert isinstance(model.bn, nn.BatchNorm2d)
    with pytest.raises(ConfigError, match="training mode"):
        fold_batchnorm(Tapped(), images(1))
    q = SmallBNCNN().eval()
    lowbit.quantize(q, "int8-weight-only")
    with pytest.raises(ConfigError, match="already quantized"):
        fold_batchnorm(q, images(1))


@pytest.mark.parametrize("name,n", [("resnet18", 20), ("mobilenet_v3_small", 34)])
def test_fold_batchnorm_torchvision(name, n):
    from lowbit.nn.fold import fold_batchnorm

    model = tv_model(name)
    x = images(2, TV_SIZES[name])
    with torch.no_grad():
        ref = model(x)
    assert len(fold_batchnorm(model, (x,))) == n
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert (model(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
