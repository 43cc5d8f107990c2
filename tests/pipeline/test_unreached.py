"""Towers that text calibration does not reach (the multimodal Gemma-3's vision tower):
left in float with a coverage line naming the adapter's reason when their static quantizers
saw no data, quantized when the forward loop feeds them, RTN under weight-only recipes; a
starving quantizer anywhere else is still an error (lowbit.pipeline.unreached)."""

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CalibrationError
from lowbit.nn.modules import QuantMixin
from tests.tiny_models import VOCAB, build, calib_ids, loop_over

TOWER = "model.vision_tower"


def _quantize(model, recipe, loop):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lowbit.quantize(model, recipe, loop)
    return [str(x.message) for x in w]


def _tower(model):
    return [(n, m) for n, m in model.named_modules()
            if n.startswith(TOWER + ".") and isinstance(m, nn.Linear)]


@pytest.mark.parametrize("recipe", ["int8-smoothquant", "fp8"])
def test_text_calibration_leaves_the_vision_tower_in_float(recipe):
    m = build("gemma3_mm")
    ids = calib_ids(2)
    msgs = _quantize(m, recipe, loop_over(ids))
    tower = _tower(m)
    assert tower and not any(isinstance(x, QuantMixin) for _, x in tower)  # float class
    assert not any(hasattr(x, "input_quantizer") for _, x in tower)
    text = [x for n, x in m.named_modules() if n.startswith("model.language_model.")
            and isinstance(x, QuantMixin)]
    assert text and all(x.input_quantizer.amax is not None for x in text)
    rep = m.lowbit_report
    kinds = {(k, r) for k, r, _, _ in rep.coverage.kinds()}
    unreached = [r for k, r in kinds if k == "unreached"]
    assert len(unreached) == 1 and "vision tower" in unreached[0]
    assert "gemma3_mm" in unreached[0] and "no calibration data" in unreached[0]
    assert {r["tower"] for r in rep.unreached} == {TOWER}
    assert not any(n.startswith(TOWER) for n in rep.quantized)
    assert not any(n.startswith(TOWER) for n, _ in rep.kv_cache)
    assert any("calibration did not reach model.vision_tower" in s for s in msgs)
    assert torch.isfinite(m(input_ids=ids[:1]).logits).all()


def test_weight_only_quantizes_the_tower_without_data_and_says_so():
    m = build("gemma3_mm")
    _quantize(m, "int4-weight-only", None)
    tower = _tower(m)
    assert tower and all(isinstance(x, QuantMixin) for _, x in tower)
    rep = m.lowbit_report
    assert not any(k == "unreached" for k, *_ in rep.coverage.kinds())
    (row,) = rep.unreached
    assert row["tower"] == TOWER and "round to nearest" in row["action"]


def _image_loop(n=2):
    """Calibration that feeds images: 4 image tokens per image (mm_tokens_per_image)."""
    g = torch.Generator().manual_seed(3)

    def loop(model):
        for _ in range(n):
            ids = torch.randint(3, VOCAB - 3, (1, 12), generator=g)
            ids[0, 2:6] = VOCAB - 1  # image_token_index
            px = torch.randn(1, 3, 32, 32, generator=g)
            model(input_ids=ids, pixel_values=px)
    return loop


def test_a_loop_that_feeds_images_quantizes_the_tower():
    m = build("gemma3_mm")
    _quantize(m, "fp8", _image_loop())
    tower = _tower(m)
    assert tower and all(isinstance(x, QuantMixin) and x.input_quantizer.amax is not None
                         for _, x in tower)
    rep = m.lowbit_report
    assert not any(k == "unreached" for k, *_ in rep.coverage.kinds())
    assert not any("left in float" in r["action"] for r in rep.unreached)


def test_starving_quantizer_outside_a_declared_tower_still_raises():
    m = build("llama")
    m.model.unused = nn.Linear(64, 64)  # never called by the forward
    with pytest.raises(CalibrationError, match="model.unused"):
        _quantize(m, "fp8", loop_over(calib_ids(2)))


def test_kv_cache_quantizers_only_on_the_decoder_attention():
    """The vision encoder's attention keeps no KV cache: the swap's KV quantizer there is
    removed and listed, even when the loop feeds images."""
    m = build("gemma3_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(m, "fp8", _image_loop(), kv_cache="fp8")
    rep = m.lowbit_report
    assert [n for n, _ in rep.kv_cache] == [f"model.language_model.layers.{i}.self_attn"
                                           for i in range(2)]
    enc = "model.vision_tower.encoder.layers.0.self_attn"
    assert [n for n, _ in rep.kv_cache_skipped] == [enc]
    assert not hasattr(m.get_submodule(enc), "k_cache_quantizer")
    assert all(a.k_cache_quantizer.amax is not None for a in
               (m.model.language_model.layers[i].self_attn for i in range(2)))
