"""Native checkpoints of quantized MoE models: per-expert codes, reload bit for bit."""

import json

import pytest
import torch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.nn.experts import MoEExperts
from tests.moe_models import MOE_FAMILIES, VOCAB, build_moe

pytest.importorskip("transformers")

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(6))


def quantized(family, recipe):
    m = build_moe(family)
    lowbit.quantize(m, recipe, calib_data=CALIB if recipe == "fp8" else None)
    return m


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


@pytest.mark.parametrize("recipe", ["int4-weight-only", "fp8"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_reload_is_bit_exact(family, recipe, tmp_path):
    m = quantized(family, recipe)
    lowbit.save(m, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "lowbit_checkpoint.json").read_text())
    split = {n: x.source_class for n, x in m.named_modules() if isinstance(x, MoEExperts)}
    assert split and meta["moe_experts"] == split
    name = next(iter(split))
    assert f"{name}.1.down_proj" in meta["quantized"]  # per-expert codes
    m2 = lowbit.load(tmp_path / "ckpt")
    assert all(isinstance(m2.get_submodule(n), MoEExperts) for n in split)
    assert torch.equal(logits(m), logits(m2))


def test_moe_packed_load_matches_convert(tmp_path):
    m = quantized("qwen3_moe", "int4-weight-only")
    lowbit.save(m, tmp_path / "ckpt")
    lowbit.runtime.convert(m, act_dtype=torch.float32)
    m2 = lowbit.load(tmp_path / "ckpt", packed={"act_dtype": torch.float32})
    ex = m2.model.layers[0].mlp.experts
    assert type(ex[3].down_proj).__name__ == "PackedLinear"
    torch.testing.assert_close(logits(m2), logits(m), rtol=1e-5, atol=1e-5)


def test_checkpoint_experts_missing_from_config_is_refused(tmp_path):
    m = quantized("mixtral", "int4-weight-only")
    lowbit.save(m, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "lowbit_checkpoint.json"
    meta = json.loads(f.read_text())
    meta["moe_experts"]["model.layers.0.mlp.experts"] = "Qwen3MoeExperts"
    f.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"experts 'model.layers.0.mlp.experts' "
                       r"\(Qwen3MoeExperts\)"):
        lowbit.load(tmp_path / "ckpt")
