"""Vision nets exported to ONNX QDQ and run in onnxruntime: outputs equal the fake-quantized
model's within the stated tolerance (docs/vision.md).

Tolerances, relative to the largest |output| (``scale``):

* ``EXACT`` (1e-5): models whose activations cross few quantization steps between torch and
  onnxruntime (the small ViTs and CNNs, MobileNetV3 at 64x64, every weight-only export):
  the same codes and scales, only float summation order differs (measured <= 4e-7);
* ``DEEP`` (5e-2): static-activation ResNet-18. torch's and onnxruntime's convolutions
  differ by ~1e-6; across 11M weights and 20 quantized inputs a few activations then
  land on the other side of a rounding boundary, one code apart, and the change propagates
  (measured: torch vs onnxruntime equal to 3e-6 up to layer2.0, 0.032 of 2.2 at the logits,
  the same order as the whole activation-quantization error 0.040). The weight-only export
  of the same ResNet-18 is held to ``EXACT``.
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
DEEP = 5e-2
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
TORCHVISION = ["vit_small", "mobilenet_v3_small"]


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
@pytest.mark.parametrize("name", SMALL + TORCHVISION)
def test_onnxruntime_equals_fake_quant(name, recipe, tmp_path):
    if recipe == "fp8" and name == "mobilenet_v3_small":
        pytest.skip("covered by the slow test (20 s of export); int8 runs here")
    got, fq, ref, _ = _export_and_run(name, recipe, tmp_path)
    scale = max(1e-3, float(np.abs(fq).max()))
    assert np.abs(got - fq).max() <= EXACT * scale
    assert np.abs(fq - ref).max() > 10 * EXACT * scale  # the quantizers did something


def test_mha_exports_per_part_scales_as_per_channel_dq(tmp_path):
    *_, path = _export_and_run("tiny_vit", "fp8", tmp_path)
    m = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    scale = inits["blocks.0.attn.weight_scale"]
    assert scale.shape == (3 * 64,)  # one value per row: per channel, no blocked DQ
    assert len(np.unique(scale)) == 3  # the q, k and v parts
    codes = m.graph.initializer[[i.name for i in m.graph.initializer].index(
        "blocks.0.attn.weight_quantized")]
    assert codes.data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert "blocks.0.attn.out_proj.weight_quantized" in inits
    assert m.opset_import[0].version == 19  # FP8; no opset-21 blocked scales


@pytest.mark.parametrize("recipe", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_resnet18_static(recipe, tmp_path):
    got, fq, ref, _ = _export_and_run("resnet18", recipe, tmp_path)
    scale = float(np.abs(fq).max())
    assert np.abs(got - fq).max() <= DEEP * scale
    # code flips move the output by less than the quantization itself does
    assert np.abs(got - fq).mean() <= 0.5 * np.abs(fq - ref).mean()


def test_resnet18_weight_only_is_exact(tmp_path):
    got, fq, ref, _ = _export_and_run("resnet18", W8, tmp_path)
    assert np.abs(got - fq).max() <= EXACT * float(np.abs(fq).max())


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe", [("mobilenet_v3_small", "fp8"),
                                         ("mobilenet_v3_large", "int8"),
                                         ("vit_b_16", "int8"), ("vit_b_16", "fp8")])
def test_slow_vision_models(name, recipe, tmp_path):
    got, fq, ref, _ = _export_and_run(name, recipe, tmp_path)
    scale = float(np.abs(fq).max())
    tol = DEEP if name == "mobilenet_v3_large" else EXACT
    assert np.abs(got - fq).max() <= tol * scale
