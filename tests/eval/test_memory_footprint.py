"""Memory estimates (source-text tables) and the measured weight footprint of a model."""

import pytest
import torch

import lowbit
from lowbit.errors import ConfigError
from lowbit.eval.footprint import weight_footprint
from lowbit.eval.memory import KNOWN, estimate, kv_cache_bytes, parse_params, weight_bytes
from tests.tiny_models import build


def test_seventy_billion_table():
    gb = {p: weight_bytes(70e9, p)["codes"] / 1e9 for p in ("fp32", "fp16", "fp8", "int8",
                                                             "int4")}
    assert gb == {"fp32": 280, "fp16": 140, "fp8": 70, "int8": 70, "int4": 35}


def test_llama2_7b():
    a = KNOWN["llama-2-7b"]
    assert abs(a.params() - 6.74e9) < 0.01e9
    assert round(weight_bytes(a.params(), "fp16")["total"] / 1e9) == 13  # "~14 GB"
    assert round(weight_bytes(a.params(), "fp8")["total"] / 1e9, 1) == 6.7
    assert abs(kv_cache_bytes(a, 4096) / 2**30 - 2.0) < 1e-9  # exactly 2 GiB (2.15 GB)


def test_scale_overhead():
    w = weight_bytes(1024 * 1024, "int4", group_size=64)
    assert w["scales"] == 1024 * 1024 / 64 * 2
    assert weight_bytes(16, "nvfp4")["scales"] == 1 and weight_bytes(32, "mxfp4")["scales"] == 1
    assert "kv_cache" in estimate(10**9, KNOWN["mistral-7b"])


def test_parse_params():
    assert parse_params("70B") == 70 * 10**9 and parse_params("135m") == 135 * 10**6
    with pytest.raises(ConfigError):
        parse_params("lots")


def test_smollm2_params_match_reality():
    assert abs(KNOWN["smollm2-135m"].params() - 134.5e6) < 0.2e6


def test_weight_footprint_of_quantized_model():
    model = build("llama")
    fp = weight_footprint(model)
    n = sum(p.numel() for p in model.parameters())
    assert fp["bytes"] == 4 * n
    lowbit.quantize(model, "int4-weight-only", group_size=32)
    q = weight_footprint(model)
    lin = q["quantized_params"]
    # int4 codes + one fp32 scale per 32 values instead of 4 bytes per weight
    assert q["bytes"] == pytest.approx(4 * n - 4 * lin + lin / 2 + lin / 32 * 4)
