"""Native lowbit checkpoints: bit-exact reload without the FP model; safe reading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError
from tests.tiny_models import build, calib_ids, loop_over

CASES = [("int4-weight-only", {"group_size": 32}), ("int4-weight-only-asym", {"group_size": 32}),
         ("int8", {}), ("fp8", {"kv_cache": "fp8"}), ("nvfp4", {}), ("mxfp4", {}),
         ("int4-gptq", {"group_size": 32})]


@pytest.mark.parametrize("recipe,kw", CASES, ids=[c[0] for c in CASES])
def test_reload_is_bit_exact(recipe, kw, tmp_path):
    ids = calib_ids(6, 24)
    m = build("llama")
    lowbit.quantize(m, recipe, forward_loop=loop_over(ids), **kw)
    out = tmp_path / "ckpt"
    lowbit.save(m, out)
    m2 = lowbit.load(out)
    assert torch.equal(m(ids[:2]).logits, m2(ids[:2]).logits)


def test_sharded_and_packed_sizes(tmp_path):
    m = build("llama")
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    out = tmp_path / "ckpt"
    lowbit.save(m, out, max_shard_size=50_000)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    codes = [k for k in idx["weight_map"] if k.endswith(".codes")]
    assert codes
    sd = {}
    for f in set(idx["weight_map"].values()):
        sd.update(load_file(str(out / f)))
    w = m.model.layers[0].mlp.down_proj.weight
    c = sd["model.layers.0.mlp.down_proj.weight.codes"]
    assert c.dtype == torch.uint8 and c.numel() == w.numel() // 2  # two int4 per byte
    assert torch.equal(lowbit.load(out)(calib_ids()[:1]).logits, m(calib_ids()[:1]).logits)


def test_output_exists_and_atomic(tmp_path):
    m = build("llama")
    lowbit.quantize(m, "int8-dynamic")
    out = tmp_path / "ckpt"
    lowbit.save(m, out)
    with pytest.raises(CheckpointError, match="already exists"):
        lowbit.save(m, out)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    import lowbit.export.native as nat

    orig = nat.write_shards
    nat.write_shards = boom
    try:
        with pytest.raises(RuntimeError):
            lowbit.save(m, tmp_path / "other")
    finally:
        nat.write_shards = orig
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left


@pytest.fixture
def ckpt(tmp_path):
    m = build("llama")
    lowbit.quantize(m, "int4-weight-only-asym", group_size=32)
    out = tmp_path / "ckpt"
    lowbit.save(m, out)
    return out


def test_truncated_shard(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        lowbit.load(ckpt)


def test_wrong_dtype(ckpt):
    f = ckpt / "model.safetensors"
    sd = load_file(str(f))
    k = "model.layers.0.self_attn.q_proj.weight.scale"
    sd[k] = sd[k].half()
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=f"tensor '{k}' has dtype torch.float16"):
        lowbit.load(ckpt)


def test_missing_scale(ckpt):
    f = ckpt / "model.safetensors"
    sd = load_file(str(f))
    k = "model.layers.1.mlp.up_proj.weight.zero_point"
    del sd[k]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=f"tensor '{k}' is missing"):
        lowbit.load(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        lowbit.load(tmp_path)
