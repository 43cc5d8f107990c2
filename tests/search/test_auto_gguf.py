"""Automatic mixed precision over ggml block types: bits counted as ggml stores them, and
the chosen per-layer types written to GGUF as chosen."""

import warnings
from collections import Counter

import pytest
import torch

import lowbit
from lowbit.search import auto_quantize
from tests.tiny_models import build

gguf = pytest.importorskip("gguf")


def test_auto_quantize_over_ggml_types(tmp_path):
    m = build("llama")
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))

    def loop(mod):
        for r in ids:
            mod(r[None])

    cands = {k: {"targets": [{"pattern": "*", "weight": {"format": f"gguf_{k}"}}]}
             for k in ("q4_0", "iq4_nl", "q8_0")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = auto_quantize(m, cands, 6.0, loop)
    rep = model.lowbit_auto_report
    # 18 bytes per 32 weights for Q4_0/IQ4_NL, 34 for Q8_0: the uniform bits are ggml's
    assert rep["uniform"]["q4_0"]["bits"] == 4.5 and rep["uniform"]["q8_0"]["bits"] == 8.5
    assert 4.5 < rep["actual_bits"] <= 6.0
    assert len(set(rep["choice"].values())) >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.save(model, tmp_path / "g", format="gguf")
    r = gguf.GGUFReader(tmp_path / "g" / "model.gguf")
    got = Counter(t.tensor_type.name for t in r.tensors if t.name.startswith("blk."))
    want = Counter(k.upper() for k in rep["choice"].values())
    assert {k: v for k, v in got.items() if k != "F32"} == want
