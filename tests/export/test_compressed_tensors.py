"""compressed-tensors export: transformers (with compressed-tensors) reloads it and computes
what lowbit's fake-quantized model computes."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from tests.tiny_models import build, calib_ids, loop_over

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed "
                         "(pip install lowbit[engines])")
pytestmark = pytest.mark.external

EXACT = [("int4-weight-only", {"group_size": 32}), ("int8", {}), ("fp8", {}),
         ("fp8-dynamic", {}), ("int8-dynamic", {}), ("int8", {"kv_cache": "fp8"}),
         ("int4-gptq", {"group_size": 32})]


def _export(recipe, kw, tmp_path):
    ids = calib_ids(6, 24)
    m = build("llama")
    lowbit.quantize(m, recipe, forward_loop=loop_over(ids), **kw)
    out = tmp_path / "ct"
    lowbit.save(m, out, format="compressed-tensors")
    return m, out, ids


@pytest.mark.parametrize("recipe,kw", EXACT, ids=[f"{r}{'-kv' if kw.get('kv_cache') else ''}"
                                                   for r, kw in EXACT])
def test_transformers_loads_and_matches_exactly(recipe, kw, tmp_path):
    from transformers import AutoModelForCausalLM

    m, out, ids = _export(recipe, kw, tmp_path)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ct.quantization.QuantizationConfig.model_validate(cfg)  # the package accepts the config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    a = torch.log_softmax(m(ids[:2]).logits, -1)
    b = torch.log_softmax(m2(ids[:2]).logits, -1)
    assert torch.equal(a, b)  # float32 model, float32 scales: identical to the bit


def test_asym_int4_decompresses_exactly(tmp_path):
    """transformers 5.23 mis-sizes packed zero-points on load (llm-compressor's asymmetric
    checkpoints fail the same way); compressed-tensors' own decompressor reads ours exactly."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    m, out, _ = _export("int4-weight-only-asym", {"group_size": 32}, tmp_path)
    sd = load_file(str(out / "model.safetensors"))
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    scheme = QuantizationScheme(targets=["Linear"], weights=g["group_0"]["weights"])
    for p in ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]:
        local = {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
        w = PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()
        assert torch.equal(w, m.get_submodule(p).quantized_weight())


def test_nvfp4_weights_decompress_exactly_and_load_in_bf16(tmp_path):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoModelForCausalLM

    m, out, ids = _export("nvfp4-weight-only", {}, tmp_path)
    sd = load_file(str(out / "model.safetensors"))
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    scheme = QuantizationScheme(targets=["Linear"], weights=g["group_0"]["weights"])
    p = "model.layers.0.mlp.up_proj"
    local = {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    from lowbit.export import weight_qtensor
    from lowbit.formats import get

    qt = weight_qtensor(m.get_submodule(p))
    packed = local["weight_packed"]
    vals = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2,
                                 dtype=torch.float32)
    assert torch.equal(vals, get("fp4_e2m1").decode(qt.codes))  # codes and nibble order exact
    w = NVFP4PackedCompressor.decompress(local, scheme)["weight"].float()  # bfloat16 math
    assert torch.allclose(w, m.get_submodule(p).quantized_weight(), rtol=1e-2, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    a = torch.log_softmax(m(ids[:2]).logits, -1)
    b = torch.log_softmax(m2(ids[:2]).logits.float(), -1)
    assert (a - b).abs().max() < 0.05  # bfloat16 compute in the loaded model
