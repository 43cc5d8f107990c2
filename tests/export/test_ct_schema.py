"""lowbit's compressed-tensors configs checked with compressed-tensors' own definitions.

Every config lowbit writes is validated by the installed library's pydantic models; the
constants and rules the writer uses without the library (``lowbit.export.ct_schema``) equal
the library's: format names, inferred formats, KV-cache scale names, and what its models
make of a config written without it. lowbit's presets equal the library's preset schemes
of the same meaning. Nothing here depends on which release is installed.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.core import QuantSpec
from lowbit.export import ct_schema
from lowbit.export.compressed_tensors import _arg_fields
from tests.tiny_models import build, calib_ids, loop_over

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed "
                         "(pip install lowbit[engines])")
from compressed_tensors.config import CompressionFormat  # noqa: E402
from compressed_tensors.quantization import (KVCacheScaleType, QuantizationArgs,  # noqa: E402
                                             QuantizationConfig, QuantizationScheme,
                                             QuantizationStatus)

pytestmark = pytest.mark.external

# every kind of scheme lowbit writes, as (role, spec)
SPECS = {
    "int4-g32": ("weight", {"format": "int4", "granularity": "group", "group_size": 32}),
    "int4-g32-asym": ("weight", {"format": "int4", "granularity": "group", "group_size": 32,
                                 "symmetric": False}),
    "int3-channel": ("weight", {"format": "int3", "granularity": "channel"}),
    "int8-channel": ("weight", {"format": "int8", "granularity": "channel"}),
    "int8-block": ("weight", {"format": "int8", "granularity": "block", "block": [32, 32]}),
    "fp8-tensor": ("weight", {"format": "fp8_e4m3", "granularity": "tensor"}),
    "fp8-channel": ("weight", {"format": "fp8_e4m3", "granularity": "channel"}),
    "nvfp4": ("weight", {"format": "nvfp4"}),
    "mxfp4": ("weight", {"format": "mxfp4"}),
    "mxfp8": ("weight", {"format": "mxfp8_e4m3"}),
    "int8-static-input": ("input", {"format": "int8", "granularity": "tensor"}),
    "int8-token-input": ("input", {"format": "int8", "granularity": "token",
                                   "dynamic": True}),
    "fp8-static-input": ("input", {"format": "fp8_e4m3", "granularity": "tensor"}),
    "fp8-token-input": ("input", {"format": "fp8_e4m3", "granularity": "token",
                                  "dynamic": True}),
    "nvfp4-input": ("input", {"format": "nvfp4"}),
    "mxfp4-input": ("input", {"format": "mxfp4", "dynamic": True}),
    "fp8-kv": ("kv_cache", {"format": "fp8_e4m3", "granularity": "tensor"}),
}
ARGS_OF = {k: ct_schema.quantization_args(_arg_fields(QuantSpec(**s), role, k), k)
           for k, (role, s) in SPECS.items()}


def semantic(args: dict) -> dict:
    """What a QuantizationArgs means, as the installed library parses it (its observer, a
    calibration-time choice lowbit does not make, left out)."""
    a = QuantizationArgs.model_validate(args)
    return {k: str(getattr(a, k)) for k in ("num_bits", "type", "symmetric", "group_size",
                                             "strategy", "block_structure", "dynamic",
                                             "scale_dtype", "zp_dtype")}


def test_constants_equal_the_library():
    import importlib

    base = importlib.import_module("compressed_tensors.base")  # the package's own `base`

    assert {k: CompressionFormat[k].value for k in ct_schema.FORMATS} == ct_schema.FORMATS
    assert ct_schema.KV_SCALE_NAMES == (KVCacheScaleType.KEY.value,
                                        KVCacheScaleType.VALUE.value)
    assert ct_schema.QUANT_METHOD == base.QUANTIZATION_METHOD
    assert ct_schema.STATUS_COMPRESSED == QuantizationStatus.COMPRESSED.value
    keys = (base.COMPRESSION_VERSION_NAME, base.QUANTIZATION_METHOD_NAME,
            base.SPARSITY_CONFIG_NAME, base.TRANSFORM_CONFIG_NAME)
    assert keys == ("version", "quant_method", "sparsity_config", "transform_config")


@pytest.mark.parametrize("key", list(SPECS))
def test_args_without_the_library_mean_the_same(key, monkeypatch):
    """The dump rules used without the package give args the library reads as the same."""
    role, s = SPECS[key]
    with_lib = ARGS_OF[key]
    monkeypatch.setattr(ct_schema, "library", lambda: None)
    without = ct_schema.quantization_args(_arg_fields(QuantSpec(**s), role, key), key)
    assert semantic(without) == semantic(with_lib)
    assert QuantizationArgs.model_validate(without).model_dump(mode="json") == with_lib


WEIGHTS = ["int4-g32", "int4-g32-asym", "int3-channel", "int8-channel", "int8-block",
           "fp8-tensor", "fp8-channel", "nvfp4", "mxfp4", "mxfp8"]
INPUTS = [None, "int8-static-input", "int8-token-input", "fp8-static-input",
          "fp8-token-input"]


@pytest.mark.parametrize("w", WEIGHTS)
def test_format_inference_equals_the_library(w):
    """lowbit's copy of the format rule picks the library's format for every scheme (and
    the library still has the function the writer asks)."""
    from compressed_tensors.compressors.format import infer_module_format

    for i in INPUTS + [{"nvfp4": "nvfp4-input", "mxfp4": "mxfp4-input"}.get(w)]:
        wa, ia = ARGS_OF[w], ARGS_OF[i] if i else None
        scheme = QuantizationScheme(targets=["Linear"], weights=wa, input_activations=ia)
        lib = infer_module_format(torch.nn.Linear, scheme).value
        assert ct_schema.format_name(ct_schema._own_format(wa, ia)) == lib, (w, i)
        assert ct_schema.scheme_format(wa, ia, None, w) == lib


# lowbit presets and the compressed-tensors preset schemes that mean the same
PRESETS = [("int4-weight-only", "W4A16"), ("int4-weight-only-asym", "W4A16_ASYM"),
           ("int8-dynamic", "W8A8"), ("fp8", "FP8"), ("fp8-dynamic", "FP8_DYNAMIC"),
           ("nvfp4-weight-only", "NVFP4A16"), ("nvfp4", "NVFP4"), ("mxfp4", "MXFP4"),
           ("mxfp8", "MXFP8")]


@pytest.mark.parametrize("ours,theirs", PRESETS, ids=[p for p, _ in PRESETS])
def test_presets_equal_the_library_presets(ours, theirs):
    from compressed_tensors.quantization import preset_name_to_scheme

    from lowbit.recipes import load

    t = load(ours).targets[0]
    scheme = preset_name_to_scheme(theirs, ["Linear"])
    for role, spec, args in (("weight", t.weight, scheme.weights),
                             ("input", t.input, scheme.input_activations)):
        if spec is None or args is None:
            assert spec is None and args is None, (ours, role)
            continue
        mine = ct_schema.quantization_args(_arg_fields(spec, role, ours), ours)
        assert semantic(mine) == semantic(args.model_dump(mode="json")), (ours, role)


KV_FP8 = {"kv_cache": "fp8"}
RECIPES = [
    ("int4-weight-only", {"group_size": 32}), ("int4-weight-only-asym", {"group_size": 32}),
    ("int8-weight-only", {}), ("int8", KV_FP8), ("int8-dynamic", {}), ("w4a8", {"group_size": 32}),
    ("fp8", KV_FP8), ("fp8-dynamic", {}), ("nvfp4", {}), ("nvfp4-weight-only", {}),
    ("mxfp4", {}), ("mxfp8", {}),
    ({"name": "mixed", "exclude": ["*lm_head"], "targets": [
        {"pattern": "*", "weight": {"format": "int4", "granularity": "group",
                                    "group_size": 32}},
        {"pattern": "*self_attn*", "weight": {"format": "fp8_e4m3", "granularity": "tensor"},
         "input": {"format": "fp8_e4m3", "granularity": "tensor"}}]}, {}),
]


def _export(recipe, kw, path):
    m = build("llama")
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(4, 16)), **kw)
    lowbit.save(m, path, format="compressed-tensors")
    return json.loads((path / "config.json").read_text())["quantization_config"], \
        load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("recipe,kw", RECIPES,
                         ids=[r if isinstance(r, str) else r["name"] for r, _ in RECIPES])
def test_every_config_lowbit_writes_validates(recipe, kw, tmp_path):
    """The library parses the config and dumps it back unchanged; each layer's weight
    tensors are the ones its compressor stores, every other name one the library registers;
    without the library the same config and tensors are written."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationMetadata

    q, sd = _export(recipe, kw, tmp_path / "lib")
    assert q["version"] == ct.__version__ and q["quant_method"] == "compressed-tensors"
    body = {k: v for k, v in q.items()
            if k not in ("version", "quant_method", "sparsity_config", "transform_config")}
    parsed = QuantizationConfig.model_validate(body)
    assert parsed.quantization_status == QuantizationStatus.COMPRESSED
    assert parsed.model_dump(mode="json", exclude={"quant_method"}) == body
    linears = {n for n, mod in build("llama").named_modules()
               if isinstance(mod, torch.nn.Linear)}
    leaves: dict[str, set] = {}
    for name in sd:
        mod, _, leaf = name.rpartition(".")
        leaves.setdefault(mod, set()).add(leaf)
    qparams = set(QuantizationMetadata.all_qparam_names())
    for g in parsed.config_groups.values():
        fmt = CompressionFormat(g.format).value
        want = {n for n in BaseCompressor.get_value_from_registry(fmt).compression_param_names(g)
                if n.startswith("weight")}
        mods = linears - set(q["ignore"]) if g.targets == ["Linear"] else set(g.targets)
        for mod in mods:
            assert {n for n in leaves[mod] if n.startswith("weight")} == want, (mod, fmt)
            assert {n for n in leaves[mod] if not n.startswith("weight")} <= qparams | {"bias"}
    attn = {f"model.layers.{i}.self_attn" for i in range(2)}
    for a in attn & set(leaves):
        assert leaves[a] <= qparams, a
    if q["kv_cache_scheme"] is not None:  # the names compressed-tensors and vLLM read
        for a in attn:
            assert f"{a}.{KVCacheScaleType.KEY.value}" in sd
            assert f"{a}.{KVCacheScaleType.VALUE.value}" in sd

    with pytest.MonkeyPatch.context() as mp:  # the same export without the library
        mp.setattr(ct_schema, "library", lambda: None)
        q2, sd2 = _export(recipe, kw, tmp_path / "own")
    assert q2["version"] == ct_schema.CT_VERSION
    body2 = {k: v for k, v in q2.items() if k in body}
    assert QuantizationConfig.model_validate(body2).model_dump(
        mode="json", exclude={"quant_method"}) == body
    assert sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_a_release_that_packs_differently_is_refused(monkeypatch, tmp_path):
    """A compressed-tensors that packs 3-bit codes otherwise (0.15-0.17 put whole codes in
    each int32) would misread lowbit's weights: the export refuses instead."""
    from compressed_tensors.compressors.pack_quantized import helpers

    from lowbit.errors import ConfigError

    m = build("llama")
    lowbit.quantize(m, {"name": "int3", "targets": [{"pattern": "*", "weight": {
        "format": "int3", "granularity": "channel"}}]})
    monkeypatch.setattr(helpers, "pack_to_int32", lambda v, bits, packed_dim=1: v[..., :1])
    ct_schema._packs_like.cache_clear()
    try:
        with pytest.raises(ConfigError, match="packs 3-bit codes per int32 word"):
            lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    finally:
        ct_schema._packs_like.cache_clear()
    assert not (tmp_path / "ct").exists()
