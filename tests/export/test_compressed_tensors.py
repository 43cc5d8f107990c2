"""compressed-tensors export: transformers (with compressed-tensors) reloads it and computes
what lowbit's fake-quantized model computes.

Measured on the tiny Llama (max |difference| of next-token log-probs, transformers 5.23/5.24
+ compressed-tensors 0.20.1, CPU):

* float32 model: int4 g32, int4 GPTQ, W4A8, int8 W8A8 static and dynamic, fp8 static and
  dynamic: 0, identical to the bit; fp8 with an fp8 KV cache: 0 where the reader applies
  KV-cache schemes (transformers <= 5.23; compressed-tensors <= 0.20.1 applies none with
  transformers >= 5.24, see test_fp8_kv_cache_scales_arrive);
* bfloat16 model: NVFP4 and MXFP4 weight-only, int4 with bf16 scales: 0;
* bfloat16 model, quantized activations: the weights are identical, the activations are
  not quantized the same way by compressed-tensors: int8 W8A8 ~0.015 (it divides by the
  scale in bfloat16), NVFP4 ~0.05 (block amax / 6 in bfloat16), MXFP4 ~0.12 (it rounds the
  block amax to the nearest power of two, OCP MX takes the floor);
* asymmetric int4: compressed-tensors' decompressor reads ours exactly; transformers 5.0 +
  compressed-tensors 0.15 and 5.17 + 0.19 reload it exactly, 5.0 + 0.18 and 5.23/5.24 +
  0.20.1 cannot load asymmetric pack-quantized weights (see
  test_asym_int4_loads_in_transformers; LOWBIT_CT_OLD_PYTHON runs the check in another
  interpreter).
"""

import json
import os
import subprocess
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import ConfigError
from tests.tiny_models import build, calib_ids, loop_over

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed "
                         "(pip install lowbit[engines])")
pytestmark = pytest.mark.external


def tiny(dtype=torch.float32):
    """The tiny Llama; bfloat16 parameters keep float32 buffers (RoPE), as from_pretrained."""
    m = build("llama")
    for p in m.parameters():
        p.data = p.data.to(dtype)
    return m


def quantized(recipe, kw=None, dtype=torch.float32):
    ids = calib_ids(6, 24)
    m = tiny(dtype)
    lowbit.quantize(m, recipe, forward_loop=loop_over(ids), **(kw or {}))
    return m


def export(m, path, **options):
    lowbit.save(m, path, format="compressed-tensors", **options)
    return path


def hf_load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    return m


@torch.no_grad()
def logprobs(m, ids):
    return torch.log_softmax(m(ids).logits.float(), -1)


def weights_equal(m, m2):
    for name, mod in m.named_modules():
        if hasattr(mod, "weight_quantizer") and mod.weight_quantizer.is_enabled:
            w2 = m2.get_submodule(name).weight  # decompressed on the first forward
            assert torch.equal(mod.quantized_weight(), w2), name


IDS = calib_ids(2, 24, seed=7)

EXACT = [("int4-weight-only", {"group_size": 32}), ("int4-gptq", {"group_size": 32}),
         ("w4a8", {"group_size": 32}), ("int8", {}), ("int8-dynamic", {}),
         ("fp8", {}), ("fp8-dynamic", {})]


@pytest.mark.parametrize("recipe,kw", EXACT, ids=[r for r, _ in EXACT])
def test_float32_variants_reload_bit_exact(recipe, kw, tmp_path):
    m = quantized(recipe, kw)
    m2 = hf_load(export(m, tmp_path / "ct"))
    assert torch.equal(logprobs(m, IDS), logprobs(m2, IDS))
    weights_equal(m, m2)


def reader_applies_kv_cache_scheme() -> bool:
    """Whether the installed compressed-tensors attaches KV-cache scales to the installed
    transformers' attention: its ``apply_quantization_config`` (what transformers runs on
    load) with only a ``kv_cache_scheme``, on a tiny Llama. A probe of behaviour, not of
    version numbers."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    m = build("llama")
    cfg = QuantizationConfig(config_groups={}, quantization_status="frozen", kv_cache_scheme={
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False})
    apply_quantization_config(m, cfg)
    return hasattr(m.model.layers[0].self_attn, "k_scale")


def test_fp8_kv_cache_scales_arrive(tmp_path):
    """FP8 weights, activations and KV cache: transformers loads the k/v scales lowbit wrote
    into the attention modules and computes what lowbit computes, to the bit."""
    import transformers

    m = quantized("fp8", {"kv_cache": "fp8"})
    out = export(m, tmp_path / "ct")
    sd = load_file(str(out / "model.safetensors"))
    if not reader_applies_kv_cache_scheme():
        pytest.skip(f"transformers {transformers.__version__} + compressed-tensors "
                    f"{ct.__version__} attach no KV-cache scales to attention, so no scales "
                    "can arrive (cause with transformers >= 5.24: attention's past_key_values "
                    "parameter became `cache`, which compressed-tensors <= 0.20.1 does not "
                    "look for); names are checked in test_ct_schema.py")
    m2 = hf_load(out)  # no missing or unexpected key
    for i, layer in enumerate(m.model.layers):
        for kv in "kv":
            name = f"model.layers.{i}.self_attn.{kv}_scale"
            got = getattr(m2.model.layers[i].self_attn, f"{kv}_scale")
            want = getattr(layer.self_attn, f"{kv}_cache_quantizer").amax.reshape(1) / 448
            assert torch.equal(sd[name], want) and torch.equal(got.data.reshape(1), want), name
    ref = logprobs(m, IDS)
    assert torch.equal(logprobs(m2, IDS), ref)
    for layer in m.model.layers:  # the KV cache's quantization is visible in the output
        layer.self_attn.k_cache_quantizer.disable()
        layer.self_attn.v_cache_quantizer.disable()
    assert not torch.equal(logprobs(m, IDS), ref)


BF16_W = {"name": "int4-bf16", "targets": [{"pattern": "*", "weight": {
    "format": "int4", "granularity": "group", "group_size": 32, "scale_format": "bf16"}}]}
MXFP4_W = {"name": "mxfp4-w", "targets": [{"pattern": "*", "weight": {"format": "mxfp4"}}]}


@pytest.mark.parametrize("recipe", ["nvfp4-weight-only", MXFP4_W, BF16_W],
                         ids=["nvfp4-weight-only", "mxfp4-weight-only", "int4-bf16-scales"])
def test_bfloat16_variants_reload_bit_exact(recipe, tmp_path):
    m = quantized(recipe, dtype=torch.bfloat16)
    m2 = hf_load(export(m, tmp_path / "ct"), torch.bfloat16)
    assert torch.equal(logprobs(m, IDS), logprobs(m2, IDS))
    weights_equal(m, m2)


TOLERANT = [("nvfp4", 0.15), ("mxfp4", 0.4),
            ({"name": "w8a8-bf16", "targets": [{"pattern": "*",
              "weight": {"format": "int8", "granularity": "channel", "scale_format": "bf16"},
              "input": {"format": "int8", "granularity": "tensor", "scale_format": "bf16"}}]},
             0.06)]


@pytest.mark.parametrize("recipe,tol", TOLERANT, ids=["nvfp4", "mxfp4", "int8-w8a8-bf16"])
def test_bfloat16_activation_variants_within_tolerance(recipe, tol, tmp_path):
    """Weights identical; compressed-tensors quantizes bf16 activations its own way."""
    m = quantized(recipe, dtype=torch.bfloat16)
    m2 = hf_load(export(m, tmp_path / "ct"), torch.bfloat16)
    d = (logprobs(m, IDS) - logprobs(m2, IDS)).abs().max().item()
    print(f"max |log-prob difference|: {d:.4f}")
    assert d < tol
    weights_equal(m, m2)


def test_config_and_tensors_as_compressed_tensors_writes_them(tmp_path):
    from transformers.utils.quantization_config import CompressedTensorsConfig

    m = quantized("int4-weight-only", {"group_size": 32})
    out = export(m, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    parsed = ct.quantization.QuantizationConfig.model_validate(q)  # the package accepts it
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.group_size, w.symmetric) == (4, 32, True)
    assert CompressedTensorsConfig.from_dict(q).quantization_config is not None
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["version"] == ct.__version__
    assert q["ignore"] == ["lm_head"]
    g = q["config_groups"]["group_0"]
    assert g["targets"] == ["Linear"] and g["format"] == "pack-quantized"
    assert g["weights"]["num_bits"] == 4 and g["weights"]["strategy"] == "group"
    assert g["weights"]["group_size"] == 32 and g["weights"]["symmetric"]
    sd = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert sd[f"{p}.weight_packed"].dtype == torch.int32
    assert sd[f"{p}.weight_packed"].shape == (64, 128 * 4 // 32)
    assert sd[f"{p}.weight_scale"].dtype == torch.float32
    assert sd[f"{p}.weight_scale"].shape == (64, 4)
    assert torch.equal(sd[f"{p}.weight_shape"], torch.tensor([64, 128]))
    assert f"{p}.weight" not in sd and f"{p}.weight_zero_point" not in sd
    assert "lm_head.weight" in sd and sd["lm_head.weight"].dtype == torch.float32
    assert (out / "generation_config.json").is_file()


def tied_tiny():
    """The tiny Llama with lm_head tied to embed_tokens, as SmolLM2."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def test_tied_embeddings_written_once(tmp_path):
    m = tied_tiny()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    out = export(m, tmp_path / "ct")
    sd = load_file(str(out / "model.safetensors"))
    # written once, under the embedding's name, as transformers' save_pretrained does
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    m2 = hf_load(out)
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logprobs(m, IDS), logprobs(m2, IDS))


def test_mixed_precision_and_exclusions(tmp_path):
    recipe = {"name": "mixed", "exclude": ["*lm_head", "*layers.1.mlp.down_proj"], "targets": [
        {"pattern": "*", "weight": {"format": "int4", "granularity": "group", "group_size": 32}},
        {"pattern": "*self_attn*", "weight": {"format": "int8", "granularity": "channel"}}]}
    m = quantized(recipe)
    out = export(m, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    g = q["config_groups"]
    assert len(g) == 2 and sorted(len(v["targets"]) for v in g.values()) == [5, 8]
    assert "model.layers.1.mlp.down_proj" not in g["group_0"]["targets"] + g["group_1"]["targets"]
    m2 = hf_load(out)
    assert torch.equal(logprobs(m, IDS), logprobs(m2, IDS))
    assert not hasattr(m2.model.layers[1].mlp.down_proj, "quantization_scheme")


def test_nvfp4_mxfp4_kv_tensors(tmp_path):
    m = quantized("mxfp4")
    sd = load_file(str(export(m, tmp_path / "mx") / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"  # [64, 128]
    assert sd[f"{p}.weight_packed"].dtype == torch.uint8
    assert sd[f"{p}.weight_packed"].shape == (64, 64)
    assert sd[f"{p}.weight_scale"].dtype == torch.uint8  # E8M0: 2^(code - 127)
    assert sd[f"{p}.weight_scale"].shape == (64, 4)
    qt = lowbit.export.weight_qtensor(m.get_submodule(p))
    assert torch.equal(2.0 ** (sd[f"{p}.weight_scale"].float() - 127), qt.scale)

    m = quantized("nvfp4")
    out = export(m, tmp_path / "nv")  # float32 model: written as bfloat16 (see the module doc)
    sd = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.self_attn.q_proj"
    assert sd[f"{p}.weight_packed"].dtype == torch.uint8
    assert sd[f"{p}.weight_packed"].shape == (64, 32)
    assert sd[f"{p}.weight_scale"].dtype == torch.float8_e4m3fn
    assert sd[f"{p}.weight_scale"].shape == (64, 4)
    assert sd[f"{p}.weight_global_scale"].dtype == torch.float32
    assert sd[f"{p}.input_global_scale"].shape == (1,)
    amax = m.get_submodule(p).input_quantizer.amax
    # compressed-tensors' convention: global = 448 * 6 / amax (lowbit keeps amax / (448 * 6))
    assert torch.allclose(sd[f"{p}.input_global_scale"], 448 * 6 / amax, rtol=1e-5)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"

    m = quantized("int8", {"kv_cache": "fp8"})
    out = export(m, tmp_path / "kv")
    sd = load_file(str(out / "model.safetensors"))
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "int-quantized"
    assert q["kv_cache_scheme"]["type"] == "float" and q["kv_cache_scheme"]["num_bits"] == 8
    attn = m.model.layers[1].self_attn
    k = sd["model.layers.1.self_attn.k_scale"]
    assert k.shape == (1,) and torch.equal(k, attn.k_cache_quantizer.amax.reshape(1) / 448)
    assert sd["model.layers.1.mlp.up_proj.weight"].dtype == torch.int8
    assert sd["model.layers.1.mlp.up_proj.input_scale"].shape == (1,)


def decompresses_exactly(m, out, layers) -> bool:
    """Whether compressed-tensors' own pack-quantized decompressor, given the exported
    config and tensors of ``layers``, gives lowbit's quantized weights to the bit."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    sd = load_file(str(out / "model.safetensors"))
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    scheme = QuantizationScheme(targets=["Linear"], weights=g["group_0"]["weights"])
    for p in layers:
        local = {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
        w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        if not torch.equal(w, m.get_submodule(p).quantized_weight()):
            return False
    return True


def test_asym_int4_decompresses_exactly(tmp_path):
    m = quantized("int4-weight-only-asym", {"group_size": 32})
    out = export(m, tmp_path / "ct")
    sd = load_file(str(out / "model.safetensors"))
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert g["group_0"]["weights"]["zp_dtype"] == "torch.int8"
    assert sd["model.layers.0.mlp.down_proj.weight_zero_point"].dtype == torch.int32
    assert decompresses_exactly(m, out, ["model.layers.0.mlp.down_proj",
                                         "model.layers.1.self_attn.k_proj"])


def test_asym_int4_loads_in_transformers(tmp_path):
    """Asymmetric int4 reloads in the installed transformers bit-exactly. Where that reader
    cannot load it (measured: transformers 5.0 + compressed-tensors 0.15 loads it exactly;
    5.0 + 0.18 fails to unpack the zero-points; 5.23/5.24 + 0.20.1 create unpacked
    zero-points), the test skips only if compressed-tensors' own decompressor reads the same
    tensors exactly, so a fault in lowbit's tensors still fails."""
    import transformers
    from transformers import AutoModelForCausalLM

    m = quantized("int4-weight-only-asym", {"group_size": 32})
    out = export(m, tmp_path / "ct")
    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m2, info = AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
        mismatched = sorted(k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"])
        if mismatched:
            problem = f"size mismatch of {mismatched[0]}"
        else:
            got = logprobs(m2, IDS)  # decompresses on the first forward
    except Exception as e:  # noqa: BLE001 - judged below by the library's own decompressor
        problem = f"{type(e).__name__}: {str(e)[:120]}"
    if problem:
        layers = [n for n, mod in m.named_modules() if getattr(mod, "weight_quantizer", None)
                  is not None and mod.weight_quantizer.is_enabled]
        assert decompresses_exactly(m, out, layers), problem
        pytest.skip(f"transformers {transformers.__version__} + compressed-tensors "
                    f"{ct.__version__} cannot load asymmetric pack-quantized weights "
                    f"({problem}); compressed-tensors' decompressor reads ours exactly")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(got, logprobs(m, IDS))


@pytest.mark.skipif(not os.environ.get("LOWBIT_CT_OLD_PYTHON"),
                    reason="set LOWBIT_CT_OLD_PYTHON to a python with transformers 5.17 + "
                           "compressed-tensors 0.19 (and torch, safetensors)")
def test_asym_int4_loads_in_older_transformers(tmp_path):
    m = quantized("int4-weight-only-asym", {"group_size": 32})
    out = export(m, tmp_path / "ct")
    save_file({"ids": IDS, "ref": logprobs(m, IDS)}, str(tmp_path / "ref.safetensors"))
    code = (
        "import sys, torch, warnings; warnings.simplefilter('ignore')\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM\n"
        "r = load_file(sys.argv[2])\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "with torch.no_grad(): lp = torch.log_softmax(m(r['ids']).logits, -1)\n"
        "d = (lp - r['ref']).abs().max()\n"
        "print('EQUAL' if torch.equal(lp, r['ref']) else 'DIFF %g' % d)\n")
    res = subprocess.run([os.environ["LOWBIT_CT_OLD_PYTHON"], "-c", code, str(out),
                          str(tmp_path / "ref.safetensors")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert res.stdout.strip().endswith("EQUAL"), res.stdout + res.stderr[-2000:]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_int32_is_compressed_tensors_packing(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import (pack_to_int32,
                                                                      unpack_from_int32)

    from lowbit.export.compressed_tensors import pack_int32

    g = torch.Generator().manual_seed(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    for shape in [(3, 64), (5, 37), (2, 1)]:
        v = torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)
        ours = pack_int32(v, bits)
        assert torch.equal(ours, pack_to_int32(v, bits)), shape
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape)), v)
        assert torch.equal(pack_int32(v.t(), bits).t(), pack_to_int32(v, bits, packed_dim=0))


def test_nvfp4_global_scale_convention():
    from lowbit.export.compressed_tensors import ct_global_scale
    from lowbit.formats import get

    vals = get("e4m3").values()
    vals = vals[vals > 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        gs = (torch.rand((), generator=g) * 12).exp() / 2688
        c = ct_global_scale(gs)
        assert abs(c.item() * gs.item() - 1) < 64 * 2**-23  # ~ 448 * 6 / amax
        hits = (vals / c == vals * gs).float().mean()
        assert hits > 0.2  # most block scales divide to lowbit's product exactly
        used = vals[::7]
        cu = ct_global_scale(gs, used)
        assert (used / cu == used * gs).float().mean() >= (used / c == used * gs).float().mean()


def test_sharded_export_loads(tmp_path):
    m = quantized("int8-dynamic")
    out = export(m, tmp_path / "ct", max_shard_size=40_000)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    assert idx["metadata"]["total_size"] > 0
    assert torch.equal(logprobs(m, IDS), logprobs(hf_load(out), IDS))


def test_inexact_scales_warn(tmp_path):
    m = quantized("int4-weight-only", {"group_size": 32}, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="not exactly representable in torch.bfloat16"):
        export(m, tmp_path / "a")
    m = quantized("int4-weight-only", {"group_size": 32})
    with pytest.warns(UserWarning, match="scale_format"):
        export(m, tmp_path / "b", dtype="bfloat16")
    sd = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sd["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16


@pytest.mark.parametrize("recipe,match", [
    ({"targets": [{"pattern": "*", "weight": {"format": "uint4", "granularity": "group",
                                              "group_size": 32, "symmetric": False}}]},
     "unsigned"),
    ({"targets": [{"pattern": "*", "weight": "fp8_e5m2"}]}, "no element format fp8_e5m2"),
    ({"targets": [{"pattern": "*", "weight": {"format": "int8", "granularity": "channel"},
                   "input": {"format": "int8", "granularity": "channel"}}]},
     "per-channel activation"),
])
def test_unsupported_specs_are_config_errors(recipe, match, tmp_path):
    m = quantized(recipe)
    with pytest.raises(ConfigError, match=match):
        export(m, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_export_runs_no_forward_pass(tmp_path):
    m = quantized("fp8", {"kv_cache": "fp8"})

    def boom(*a, **k):
        raise AssertionError("export ran a forward pass")

    for mod in m.modules():
        mod.register_forward_pre_hook(boom)
    export(m, tmp_path / "ct")
    lowbit.save(m, tmp_path / "native")


@pytest.mark.slow
def test_real_model_int4_g64(tmp_path):
    """SmolLM2-135M, int4 g64: transformers reloads the export and its log-probs on a
    sentence equal lowbit's fake-quantized model's to the bit (float32)."""
    from lowbit.data import load_model

    model, tok = load_model()
    lowbit.quantize(model, "int4-weight-only", group_size=64)
    out = export(model, tmp_path / "ct", tokenizer=tok)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    ids = tok("It is a truth universally acknowledged, that a single man in possession of "
              "a good fortune, must be in want of a wife.", return_tensors="pt").input_ids
    m2 = hf_load(out)
    assert torch.equal(logprobs(model, ids), logprobs(m2, ids))
    # sizes: 4-bit codes packed 8 per int32, float32 scales per 64
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.layers.0.mlp.down_proj.weight_packed"].shape == (576, 1536 // 8)
