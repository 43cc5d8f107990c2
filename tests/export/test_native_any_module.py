"""Native checkpoints of any ``nn.Module``: ``lowbit.load(path, model=...)`` loads into an
un-quantized instance (or what a constructor returns); transformers models of any head are
rebuilt as the saved class. Outputs equal the saved fake-quantized model bit for bit;
mismatches are one-line errors naming the module."""

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CheckpointError, ConfigError
from lowbit.nn import QuantMixin
from tests.tiny_models import SmallCNN, build, calib_ids, loop_over

pytestmark = pytest.mark.filterwarnings("ignore:recipe .*group size fallback")

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def cnn_quantized(recipe="int8", model=None):
    m = (model or SmallCNN()).eval()
    lowbit.quantize(m, recipe, forward_loop=lambda mm: [mm(X[i:i + 2]) for i in (0, 2)])
    return m


def states(m):
    """Every quantizer's spec, mode and statistics, by name."""
    return {n: (q.spec, q.mode, None if q.amax is None else q.amax.tolist())
            for n, q in lowbit.nn.quantizers(m)}


@pytest.mark.parametrize("recipe", ["int8", "fp8", "int8-dynamic", "int4-weight-only-asym"])
@pytest.mark.parametrize("how", ["class", "instance", "function"])
def test_cnn_reload_is_bit_exact(recipe, how, tmp_path):
    m = cnn_quantized(recipe)
    lowbit.save(m, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"lowbit_checkpoint.json",
                                                              "model.safetensors"}
    arg = {"class": SmallCNN, "instance": SmallCNN(), "function": lambda: SmallCNN()}[how]
    m2 = lowbit.load(tmp_path / "ckpt", model=arg)
    if how == "instance":
        assert m2 is arg  # loaded in place
    assert isinstance(m2, SmallCNN) and isinstance(m2.conv1, QuantMixin)
    assert torch.equal(m(X), m2(X)) and states(m) == states(m2)
    assert m2.lowbit_recipe == m.lowbit_recipe and not m2.training


def test_bfloat16_model_into_float32_instance(tmp_path):
    m = SmallCNN().to(torch.bfloat16)
    lowbit.quantize(m.eval(), "int8-weight-only")
    lowbit.save(m, tmp_path / "ckpt")
    m2 = lowbit.load(tmp_path / "ckpt", model=SmallCNN)  # built in float32, cast on load
    assert m2.conv1.weight.dtype == torch.bfloat16 == m2.head.bias.dtype
    x = X.bfloat16()
    assert torch.equal(m(x), m2(x))


class Attn(nn.Module):
    """A ViT-like block: patch conv, nn.MultiheadAttention, LayerNorm, MLP, head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.norm = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        y = self.norm(t)
        t = t + self.attn(y, y, y, need_weights=False)[0]
        t = t + self.mlp(t)
        return self.head(t.mean(1))


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_multihead_attention_model(recipe, tmp_path):
    m = cnn_quantized(recipe, Attn())
    lowbit.save(m, tmp_path / "ckpt")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "attn.weight.codes" in stored and "attn.in_proj_weight" not in stored
    m2 = lowbit.load(tmp_path / "ckpt", model=Attn)
    assert isinstance(m.attn, QuantMixin) and isinstance(m.attn.out_proj, QuantMixin)
    assert type(m2.attn) is type(m.attn) and type(m2.attn.out_proj) is type(m.attn.out_proj)
    assert torch.equal(m(X), m2(X)) and states(m) == states(m2)
    # convert: out_proj (a Linear subclass) packs, the packed in_proj stays fake-quantized
    import lowbit.runtime as rt

    rep = rt.convert(m2)
    assert set(rep.kept) == ({"attn"} if recipe == "int8" else {"attn", "patch"})  # fp8 conv
    assert "no packed path" in rep.kept["attn"]
    assert isinstance(m2.attn.out_proj, rt.PackedLinear)
    with torch.no_grad():
        ref, out = m(X), m2(X)
    # int8: out_proj's W8A8 kernel runs these few rows through the int8 GEMV, whose integer
    # sums are rounded once to bfloat16 (docs/runtime.md, Tolerances)
    tol = 2 ** -8 if recipe == "int8" else 1e-4
    assert float((out - ref).abs().max() / ref.abs().max()) < tol


def test_errors_name_the_module(tmp_path):
    lowbit.save(cnn_quantized(), tmp_path / "ckpt")
    ck = tmp_path / "ckpt"

    class Narrow(SmallCNN):
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Conv2d(16, 24, 3, padding=1)

    class Swapped(SmallCNN):
        def __init__(self):
            super().__init__()
            self.conv2 = nn.Identity()

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = SmallCNN()

    class Extra(SmallCNN):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    cases = [(Narrow, CheckpointError, r"module 'conv2' has a weight of shape \[24, 16, 3, 3\] "
              r"in the given model \(Narrow\); the checkpoint's is \[32, 16, 3, 3\]"),
             (Swapped, CheckpointError, "module 'conv2' is a Identity in the given model "
              r"\(Swapped\); the checkpoint quantized a Conv2d there"),
             (Renamed, CheckpointError, r"quantized module 'conv1' \(Conv2d\) does not exist in "
              r"the given model \(Renamed\)"),
             (Extra, CheckpointError, r"tensor 'extra.weight' is missing from the checkpoint "
              r"\(2 missing in all; the given model \(Extra\) has them\)"),
             (lambda: cnn_quantized(), ConfigError, "module 'conv1' is a QuantConv2d of "
              "lowbit: the model is already quantized"),
             (lambda: 3, ConfigError, "returned a int; expected an nn.Module"),
             (3, ConfigError, "expected an un-quantized nn.Module or a function")]
    for arg, err, msg in cases:
        with pytest.raises(err, match=msg) as e:
            lowbit.load(ck, model=arg)
        assert len(str(e.value).splitlines()) == 1
    fresh = Narrow()
    with pytest.raises(CheckpointError):
        lowbit.load(ck, model=fresh)
    assert not any(isinstance(x, QuantMixin) for x in fresh.modules())  # left as it was
    with pytest.raises(CheckpointError, match="no config.json, the checkpoint holds a "
                       "SmallCNN that is not a transformers model; pass the un-quantized "
                       r"model to load into: lowbit.load\(path, model="):
        lowbit.load(ck)


def test_checkpoints_without_the_new_metadata_still_load(tmp_path):
    m = cnn_quantized()
    lowbit.save(m, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "lowbit_checkpoint.json"
    meta = json.loads(f.read_text())
    del meta["model_module"]
    for q in meta["quantized"].values():
        del q["weight_shape"], q["class"]
    f.write_text(json.dumps(meta))
    assert torch.equal(lowbit.load(tmp_path / "ckpt", model=SmallCNN)(X), m(X))


# --- transformers models of any head ---------------------------------------------------------
IDS = calib_ids(2, 12, seed=7)


def _seq_cls():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         num_labels=3, pad_token_id=0)
    return tf.LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("how", ["config", "function", "class"])
def test_sequence_classification(how, tmp_path):
    tf = pytest.importorskip("transformers")
    m = _seq_cls()
    lowbit.quantize(m, "int8", forward_loop=loop_over(calib_ids(4, 16)))
    lowbit.save(m, tmp_path / "ckpt")
    arg = {"config": None, "function": _seq_cls,
           "class": tf.LlamaForSequenceClassification}[how]  # a class: from config.json
    m2 = lowbit.load(tmp_path / "ckpt", model=arg)
    assert type(m2).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, m2(IDS).logits)
    assert states(m) == states(m2)


def _mm_inputs(seed):
    """Text with one image (4 image tokens between BOI and EOI) and its pixels."""
    from tests.tiny_models import VOCAB

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 4, (1, 14), generator=g)
    ids[0, 2:8] = torch.tensor([VOCAB - 3] + [VOCAB - 1] * 4 + [VOCAB - 2])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)}


@pytest.mark.parametrize("how", ["config", "instance"])
def test_multimodal_gemma3_with_kv_cache(how, tmp_path):
    pytest.importorskip("transformers")
    m = build("gemma3_mm")
    lowbit.quantize(m, "fp8", kv_cache="fp8",
                    forward_loop=lambda mm: [mm(**_mm_inputs(s)) for s in range(3)])
    lowbit.save(m, tmp_path / "ckpt")
    m2 = lowbit.load(tmp_path / "ckpt", model=None if how == "config" else build("gemma3_mm"))
    assert type(m2).__name__ == "Gemma3ForConditionalGeneration"
    with torch.no_grad():
        assert torch.equal(m(**_mm_inputs(9)).logits, m2(**_mm_inputs(9)).logits)
        assert torch.equal(m(IDS).logits, m2(IDS).logits)
    kv = {n: s for n, s in states(m2).items() if "cache_quantizer" in n}
    assert kv and kv == {n: s for n, s in states(m).items() if "cache_quantizer" in n}
    assert states(m) == states(m2)


def test_causal_lm_into_given_instance_and_wrong_family(tmp_path):
    pytest.importorskip("transformers")
    m = build("llama")
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    lowbit.save(m, tmp_path / "ckpt")
    m2 = lowbit.load(tmp_path / "ckpt", model=lambda: build("llama"))
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, m2(IDS).logits)
    with pytest.raises(CheckpointError, match="does not exist in the given model"):
        lowbit.load(tmp_path / "ckpt", model=SmallCNN)


def test_moe_into_given_instance(tmp_path):
    pytest.importorskip("transformers")
    from tests.moe_models import build_moe

    m = build_moe("mixtral")
    lowbit.quantize(m, "int4-weight-only")
    lowbit.save(m, tmp_path / "ckpt")
    m2 = lowbit.load(tmp_path / "ckpt", model=build_moe("mixtral", seed=1))
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, m2(IDS).logits)


# --- torchvision (optional: tests/vision_models skips when torchvision does not import) ------
@pytest.mark.parametrize("name,recipe", [("resnet18", "int8"), ("mobilenet_v3_small", "int8"),
                                         ("vit_small", "fp8")])
def test_torchvision_models(name, recipe, tmp_path):
    vm = pytest.importorskip("tests.vision_models")
    import lowbit.runtime as rt

    m = vm.tv_model(name)
    size = vm.TV_SIZES[name]
    lowbit.quantize(m, recipe, forward_loop=vm.calib_loop(size))
    lowbit.save(m, tmp_path / "ckpt")
    x = vm.images(2, size, seed=9)
    m2 = lowbit.load(tmp_path / "ckpt", model=lambda: vm.tv_model(name, seed=1))
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(m2(x), ref)
    assert states(m) == states(m2)
    packed = lowbit.load(tmp_path / "ckpt", model=lambda: vm.tv_model(name, seed=1),
                         packed=True)
    rep = rt.convert(m2)
    convs = sum(isinstance(c, nn.Conv2d) for c in vm.tv_model(name).modules())
    if recipe == "int8":
        assert rep["conv_int8"] == convs and not rep.kept
    else:
        assert "conv_int8" not in rep and len(rep.kept) >= convs
    with torch.no_grad():
        out = packed(x)
        assert torch.equal(out, m2(x))
        # convs exact; the int8 Linear layers (w8a8_int8) rescale after an integer matmul
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
