"""``runtime.convert`` on convolutions: int8 Conv2d -> PackedConv2d (int8 codes, outputs
equal to the fake-quantized QuantConv2d), every other quantized conv named in the report."""

import pytest
import torch
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.nn import QuantConv2d
from lowbit.runtime import PackedConv2d

pytestmark = pytest.mark.filterwarnings("ignore:recipe .*group size fallback")

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class ConvNet(nn.Module):
    """Every Conv2d geometry the packed path must keep: stride, padding, dilation,
    depthwise groups, no bias, a string padding with a reflect padding mode, a 1x1 head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.c2 = nn.Conv2d(32, 32, (1, 3), padding="same", padding_mode="reflect")
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        for c in (self.c1, self.dw, self.grouped, self.c2):
            x = torch.relu(c(x))
        return self.head(x).mean((2, 3))


def quantized(recipe, model=None, dtype=torch.float32, **kw):
    m = (model or ConvNet()).to(dtype).eval()
    x = X.to(dtype)
    lowbit.quantize(m, recipe, forward_loop=lambda mm: [mm(x[i:i + 2]) for i in (0, 2)], **kw)
    return m


def conv_inputs(m, x=X):
    """The input each conv of ``m`` sees on ``X`` (hooks), by name."""
    seen, hooks = {}, []
    for name, c in m.named_modules():
        if isinstance(c, nn.Conv2d):
            hooks.append(c.register_forward_hook(
                lambda mod, a, out, name=name: seen.__setitem__(name, a[0].detach())))
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe", ["int8", "int8-dynamic", "int8-weight-only"])
def test_int8_convs_pack_and_equal_fake_quant(recipe, dtype):
    m = quantized(recipe, dtype=dtype)
    x = X.to(dtype)
    with torch.no_grad():
        ref = m(x)
    inputs = conv_inputs(m, x)
    fake = {n: getattr(m, n) for n in inputs}
    with torch.no_grad():
        per_layer = {n: fake[n](x) for n, x in inputs.items()}
    rep = rt.convert(m)
    assert rep == {"conv_int8": 5} and not rep.kept and not rep.float
    assert all(isinstance(getattr(m, n), PackedConv2d) for n in inputs)
    with torch.no_grad():
        for n, x in inputs.items():  # tolerance 0: the same dequantized weight, same conv
            assert torch.equal(getattr(m, n)(x), per_layer[n]), n
        assert torch.equal(m(X.to(dtype)), ref)
    # one int8 code per weight value, plus float32 per-channel scales
    c = m.grouped
    assert c.codes.dtype == torch.int8 and c.codes.shape == (32, 16 * 9 // 4)
    assert c.resident_nbytes() == 32 * 36 + 32 * 4 == c.packed_nbytes
    rep_mem = rt.memory_report(m)
    assert rep_mem["kernels"]["conv_int8"]["layers"] == 5


def test_group_scaled_int8_and_casts_keep_codes():
    m = quantized("gguf-q8_0", group_policy="fallback")
    with torch.no_grad():
        ref = m(X)
    rep = rt.convert(m)
    assert rep == {"conv_int8": 5}
    with torch.no_grad():
        assert torch.equal(m(X), ref)
    codes = m.c1.codes.clone()
    m.to(torch.bfloat16)
    assert m.c1.codes.dtype == torch.int8 and torch.equal(m.c1.codes, codes)
    with torch.no_grad():
        out = m(X.bfloat16()).float()
    assert float((out - ref).abs().max() / ref.abs().max()) < 5e-2


@pytest.mark.parametrize("recipe,kw,fmt", [("fp8", {}, "fp8_e4m3"),
                                           ("int4-weight-only", {"group_size": 8}, "int4")])
def test_other_formats_stay_fake_quant_and_are_named(recipe, kw, fmt):
    m = quantized(recipe, group_policy="fallback", **kw) if kw else quantized(recipe)
    with torch.no_grad():
        ref = m(X)
    rep = rt.convert(m)
    assert not rep and set(rep.kept) == {"c1", "dw", "grouped", "c2", "head"}
    assert all(fmt in why and "int8 weights only" in why for why in rep.kept.values())
    assert all(isinstance(getattr(m, n), QuantConv2d) for n in rep.kept)
    assert any(line.startswith("kept fake-quantized: 5") for line in rep.lines())
    with torch.no_grad():
        assert torch.equal(m(X), ref)


def test_output_quantized_conv1d_and_mixed_model_are_reported():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3)
            self.seq = nn.Conv1d(8, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.conv(x)).flatten(2)
            return self.fc(torch.relu(self.seq(x)).mean(-1))

    m = Mixed().eval()
    target = {"pattern": "*", "weight": {"format": "int8", "granularity": "channel"}}
    out_q = {"pattern": "conv", "weight": {"format": "int8", "granularity": "channel"},
             "output": {"format": "int8", "granularity": "tensor", "dynamic": True}}
    lowbit.quantize(m, {"name": "t", "targets": [out_q, target]}, forward_loop=lambda mm: mm(X))
    with torch.no_grad():
        ref = m(X)
    rep = rt.convert(m)
    assert rep == {"int8_weight_only": 1}
    assert rep.kept == {"conv": "output quantized",
                        "seq": "QuantConv1d: no packed path for this module type (Linear and "
                               "int8 Conv2d pack); stays fake-quantized"}
    assert "seq" not in rep.float and "conv" not in rep.float
    with torch.no_grad():
        out = m(X)
    assert float((out - ref).abs().max() / ref.abs().max()) < 2e-2  # bfloat16 linear


def test_from_qtensor_refuses_other_weights():
    from lowbit.core import QuantSpec, quantize
    from lowbit.errors import ConfigError

    conv = nn.Conv2d(3, 4, 3)
    qt = quantize(conv.weight.detach().reshape(4, -1), QuantSpec.parse(
        {"format": "fp8_e4m3", "granularity": "tensor"}, "w"))
    with pytest.raises(ConfigError, match="int8 weights only"):
        PackedConv2d.from_qtensor(qt, conv)


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_native_load_packed_convs(recipe, tmp_path):
    fake = quantized(recipe)
    lowbit.save(fake, tmp_path / "ckpt")
    packed = lowbit.load(tmp_path / "ckpt", model=ConvNet, packed=True)
    plain = lowbit.load(tmp_path / "ckpt", model=ConvNet)
    rep = rt.convert(plain)
    kinds = {n: type(c).__name__ for n, c in packed.named_children()}
    want = "PackedConv2d" if recipe == "int8" else "QuantConv2d"
    assert set(kinds.values()) == {want}
    assert {n: type(c).__name__ for n, c in plain.named_children()} == kinds
    assert rep == ({"conv_int8": 5} if recipe == "int8" else {})
    with torch.no_grad():
        out = packed(X)
        assert torch.equal(out, fake(X)) and torch.equal(out, plain(X))
    assert rt.weight_bytes(packed) == rt.weight_bytes(plain)
    if recipe == "int8":
        assert packed.c1.input_quantizer is not None and \
            torch.equal(packed.c1.input_quantizer.amax, fake.c1.input_quantizer.amax)


def test_converted_model_is_not_saved_natively(tmp_path):
    from lowbit.errors import ConfigError

    m = quantized("int8")
    rt.convert(m)
    with pytest.raises(ConfigError, match="module 'c1' is a PackedConv2d made by "
                       "lowbit.runtime.convert: save the fake-quantized model before"):
        lowbit.save(m, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    fake = quantized("int8")
    lowbit.save(fake, tmp_path / "ok")
    packed = rt.load_packed(tmp_path / "ok", model=ConvNet)
    assert isinstance(packed.c1, PackedConv2d)
    with torch.no_grad():
        assert torch.equal(packed(X), fake(X))


@pytest.mark.gpu
def test_packed_conv_on_cuda_equals_fake_quant():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    m = quantized("int8").cuda()
    x = X.cuda()
    with torch.no_grad():
        ref = m(x)
    assert rt.convert(m) == {"conv_int8": 5}
    assert m.c1.codes.device.type == "cuda"
    with torch.no_grad():
        out = m(x)
    # the same dequantized weights; cuDNN may pick another algorithm per call: ~1e-6
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("k", [8, 20, 24, 64])
@pytest.mark.parametrize("rows", [1, 4, 40])
def test_int8_weight_only_kernel_any_in_features(k, rows):
    """torch's _weight_int8pack_mm crashed (K=8, 2+ rows) or was wrong (K=20) on an AMD EPYC:
    the int8 weight-only kernel keeps it to in_features that are multiples of 16; every width
    and batch matches the fake-quantized reference."""
    torch.manual_seed(k)
    m = nn.Sequential(nn.Linear(k, 16)).eval()
    lowbit.quantize(m, {"name": "t", "targets": [{"pattern": "*", "weight": {
        "format": "int8", "granularity": "channel"}}]})
    x = torch.randn(rows, k)
    with torch.no_grad():
        ref = m(x)
    rep = rt.convert(m)
    assert rep == {"int8_weight_only": 1}
    with torch.no_grad():
        got = m(x).float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3
