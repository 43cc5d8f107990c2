"""Vision nets exported to ONNX QDQ and run in onnxruntime: outputs equal the fake-quantized
model's within the stated tolerance (docs/vision.md).

Tolerances, relative to the largest |output| (``scale``):

* ``EXACT`` (1e-5): every weight-only export (ResNet-18 and ViT-B/16 included: measured
  1.3e-6), and static activations in the small ViTs and CNNs and MobileNetV3 at 64x64
  (measured <= 4e-7): the same codes and scales, only the float summation order differs;
* ``DEEP`` (max 0.1 of the largest output, and a mean difference no larger than the mean
  quantization error, fake-quant vs float): static activations in ResNet-18, ViT-B/16 and MobileNetV3-large (there 7e-4 of
  the largest output). torch's and onnxruntime's
  convolutions and matmuls differ by ~1e-6; with millions of activations quantized 20 times
  over, a few land on the other side of a rounding boundary, one code apart, and the change
  propagates (ResNet-18 int8: torch and onnxruntime equal to 3e-6 up to layer2.0, then one
  int8 step; 0.032 of 2.2 at the logits against a whole activation-quantization error of
  0.040, mean 0.008 against 0.011; ViT-B/16 int8 0.086 of 1.9 against 0.115). Between two
  engines this is as close as static quantization of a deep net gets: each is one of the
  roundings of the same quantized model. The weight-only exports of the same models are
  held to ``EXACT``, so the graph itself (codes, scales, BatchNorm, attention) is exact.
"""

import time

import numpy as np
import pytest
import torch

import lowbit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tests.vision_models import (IMAGE, TV_SIZES, SmallBNCNN, TinyViT, calib_loop,  # noqa: E402
                                 images, tv_model)

EXACT = 1e-5
DEEP = 0.1
W8 = {"name": "w8", "targets": [{"pattern": "*", "weight": {"format": "int8",
                                                            "granularity": "channel"}}]}


def _model(name):
    if name == "tiny_vit":
        return TinyViT().eval(), IMAGE
    if name == "small_bn_cnn":
        return SmallBNCNN().eval(), IMAGE
    return tv_model(name), TV_SIZES[name]


def _export_and_run(name, recipe, tmp_path):
    """Quantize, export, run in onnxruntime; returns (ORT, fake-quant, float outputs, path)."""
    model, size = _model(name)
    x = images(2, size)
    with torch.no_grad():
        ref = model(x).numpy()
    t = time.perf_counter()
    lowbit.quantize(model, recipe, forward_loop=calib_loop(size, batches=1))
    with torch.no_grad():
        fq = model(x).numpy()
    out = lowbit.save(model, tmp_path / "onnx", format="onnx", example_inputs=(x,))
    t_export = time.perf_counter() - t
    so = ort.SessionOptions()
    fp8 = isinstance(recipe, str) and recipe.startswith("fp8")
    # FP8 QDQ runs in onnxruntime's CPU provider with graph optimization at BASIC or lower
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if fp8 else \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(out / "model.onnx"), so,
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    scale = float(np.abs(fq).max())
    rname = recipe if isinstance(recipe, str) else recipe["name"]
    print(f"\n{name} {rname}: onnxruntime vs fake-quant max abs diff "
          f"{np.abs(got - fq).max():.3g}, fake-quant vs float {np.abs(fq - ref).max():.3g}, "
          f"largest |output| {scale:.3g}; quantize+export {t_export:.1f} s")
    return got, fq, ref, out / "model.onnx"


SMALL = ["tiny_vit", "small_bn_cnn"]
TORCHVISION = ["vit_small"]


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
@pytest.mark.parametrize("name", SMALL + TORCHVISION)
def test_onnxruntime_equals_fake_quant(name, recipe, tmp_path):
    got, fq, ref, path = _export_and_run(name, recipe, tmp_path)
    scale = max(1e-3, float(np.abs(fq).max()))
    assert np.abs(got - fq).max() <= EXACT * scale
    assert np.abs(fq - ref).max() > 10 * EXACT * scale  # the quantizers did something
    if name == "tiny_vit" and recipe == "fp8":
        _check_mha_graph(path)


def _check_mha_graph(path):
    """The MHA's per-part FP8 scales are a per-channel DQ (3 distinct values over 3E rows),
    its out_proj has its own DQ, and the opset is FP8's 19 (no blocked scales)."""
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    scale = onnx.numpy_helper.to_array(inits["blocks.0.attn.weight_scale"])
    assert scale.shape == (3 * 64,) and len(np.unique(scale)) == 3
    assert inits["blocks.0.attn.weight_quantized"].data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert "blocks.0.attn.out_proj.weight_quantized" in inits
    assert "blocks.0.attn.input_scale" in inits  # the calibrated input QDQ
    assert m.opset_import[0].version == 19


def _deep_ok(got, fq, ref):
    """``DEEP``: max within 10% of the largest output, and onnxruntime no farther from the
    fake-quantized model on average than the fake-quantized model is from float."""
    scale = float(np.abs(fq).max())
    assert np.abs(got - fq).max() <= DEEP * scale
    assert np.abs(got - fq).mean() <= np.abs(fq - ref).mean()


def test_resnet18_static_int8(tmp_path):
    _deep_ok(*_export_and_run("resnet18", "int8", tmp_path)[:3])


def test_resnet18_weight_only_is_exact(tmp_path):
    got, fq, ref, _ = _export_and_run("resnet18", W8, tmp_path)
    assert np.abs(got - fq).max() <= EXACT * float(np.abs(fq).max())


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe", [
    ("mobilenet_v3_small", "int8"), ("mobilenet_v3_small", "fp8"),
    ("mobilenet_v3_large", "int8"), ("resnet18", "fp8"), ("vit_b_16", "int8"),
    ("vit_b_16", "fp8"), ("vit_b_16", "w8")])
def test_slow_vision_models(name, recipe, tmp_path):
    got, fq, ref, _ = _export_and_run(name, W8 if recipe == "w8" else recipe, tmp_path)
    if name in ("resnet18", "vit_b_16", "mobilenet_v3_large") and recipe != "w8":
        _deep_ok(got, fq, ref)
    else:
        assert np.abs(got - fq).max() <= EXACT * float(np.abs(fq).max())


class _Attn(torch.nn.Module):
    """Sequence-first self-attention returning its weights (nn.MultiheadAttention's
    defaults), then cross-attention to a memory."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.self_attn = torch.nn.MultiheadAttention(32, 4)
        self.cross = torch.nn.MultiheadAttention(32, 4)

    def forward(self, x, mem):
        y, w = self.self_attn(x, x, x)
        z, _ = self.cross(y, mem, mem, need_weights=False)
        return z + w.sum(-1).transpose(0, 1).unsqueeze(-1)


def test_mha_defaults_and_cross_attention_export_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, mem = torch.randn(5, 2, 32, generator=g), torch.randn(7, 2, 32, generator=g)
    model = _Attn().eval()
    lowbit.quantize(model, "int8", forward_loop=lambda m: m(torch.randn(5, 2, 32),
                                                            torch.randn(7, 2, 32)))
    with torch.no_grad():
        fq = model(x, mem).numpy()
    out = lowbit.save(model, tmp_path / "onnx", format="onnx", example_inputs=(x, mem))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: v.numpy() for i, v in zip(sess.get_inputs(), (x, mem))})[0]
    assert np.abs(got - fq).max() <= EXACT * float(np.abs(fq).max())


def test_folded_cnn_exports_without_batchnorm(tmp_path):
    from lowbit.nn.fold import fold_batchnorm

    model = SmallBNCNN().eval()
    x = images(2)
    fold_batchnorm(model, (x,))
    lowbit.quantize(model, "int8", forward_loop=calib_loop())
    with torch.no_grad():
        fq = model(x).numpy()
    out = lowbit.save(model, tmp_path / "onnx", format="onnx", example_inputs=(x,))
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - fq).max() <= EXACT * float(np.abs(fq).max())
