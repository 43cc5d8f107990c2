"""Reading checkpoints safely: safetensors only, every tensor checked; a damaged checkpoint
is a CheckpointError naming the tensor and the file."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError
from tests.tiny_models import build, calib_ids, loop_over


def _save(tmp_path, recipe="int4-weight-only-asym", shard=None, **kw):
    m = build("llama")
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(4, 16)), **kw)
    out = tmp_path / "ckpt"
    lowbit.save(m, out, max_shard_size=shard)
    return out


@pytest.fixture
def ckpt(tmp_path):
    return _save(tmp_path, group_size=32)


def _rewrite(f, fn):
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        lowbit.load(ckpt)


def test_truncated_shard_is_named(tmp_path):
    out = _save(tmp_path, shard=40_000, group_size=32)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    victim = shards[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{victim.name}.*truncated or corrupt"):
        lowbit.load(out)


def test_missing_shard(tmp_path):
    out = _save(tmp_path, shard=40_000, group_size=32)
    victim = sorted(out.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard .*{victim.name} is missing"):
        lowbit.load(out)


def test_wrong_dtype_of_a_scale(ckpt):
    k = "model.layers.0.self_attn.q_proj.weight.scale"

    def half(sd):
        sd[k] = sd[k].half()

    _rewrite(ckpt / "model.safetensors", half)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{k}' has dtype "
                                              r"torch.float16, expected torch.float32"):
        lowbit.load(ckpt)


def test_wrong_dtype_of_a_plain_tensor(ckpt):
    k = "model.norm.weight"

    def half(sd):
        sd[k] = sd[k].half()

    _rewrite(ckpt / "model.safetensors", half)
    with pytest.raises(CheckpointError, match=f"tensor '{k}' has dtype torch.float16"):
        lowbit.load(ckpt)


def test_wrong_shape_of_codes(ckpt):
    k = "model.layers.1.mlp.gate_proj.weight.codes"

    def cut(sd):
        sd[k] = sd[k][:, :-1].contiguous()

    _rewrite(ckpt / "model.safetensors", cut)
    with pytest.raises(CheckpointError, match=f"tensor '{k}' has shape .* expected"):
        lowbit.load(ckpt)


@pytest.mark.parametrize("key", ["model.layers.1.mlp.up_proj.weight.zero_point",
                                 "model.layers.0.self_attn.o_proj.weight.scale",
                                 "model.layers.0.self_attn.o_proj.weight.codes",
                                 "model.layers.0.input_layernorm.weight"])
def test_missing_tensor(ckpt, key):
    _rewrite(ckpt / "model.safetensors", lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is missing"):
        lowbit.load(ckpt)


def test_missing_static_statistics(tmp_path):
    out = _save(tmp_path, "int8", kv_cache="fp8")
    for key in ["model.layers.0.self_attn.k_proj.input_quantizer.amax",
                "model.layers.1.self_attn.v_cache_quantizer.amax"]:
        sd = load_file(str(out / "model.safetensors"))
        keep = sd.pop(key)
        save_file(sd, str(out / "model.safetensors"))
        with pytest.raises(CheckpointError, match=f"tensor '{key}' is missing"):
            lowbit.load(out)
        sd[key] = keep
        save_file(sd, str(out / "model.safetensors"))
    lowbit.load(out)


def test_missing_nvfp4_global_scale(tmp_path):
    out = _save(tmp_path, "nvfp4-weight-only")
    k = "model.layers.0.mlp.down_proj.weight.global_scale"
    _rewrite(out / "model.safetensors", lambda sd: sd.pop(k))
    with pytest.raises(CheckpointError, match=f"tensor '{k}' is missing"):
        lowbit.load(out)


def test_bad_metadata(ckpt):
    meta = ckpt / "lowbit_checkpoint.json"
    good = meta.read_text()
    meta.write_text(good[:-20])
    with pytest.raises(CheckpointError, match="lowbit_checkpoint.json: not valid JSON"):
        lowbit.load(ckpt)
    d = json.loads(good)
    d["version"] = 7
    meta.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="version 7"):
        lowbit.load(ckpt)
    d = json.loads(good)
    d["quantized"]["model.layers.0.mlp.up_proj"]["spec"]["format"] = "int5x"
    meta.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"quantized\['model.layers.0.mlp.up_proj'\]"):
        lowbit.load(ckpt)


def test_never_unpickles(tmp_path, monkeypatch):
    """A folder with only a pickle (pytorch_model.bin) is refused without opening it."""
    d = tmp_path / "pickle"
    d.mkdir()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    (d / "lowbit_checkpoint.json").write_text(json.dumps(
        {"format": "lowbit", "version": 1, "quantized": {}, "tied": {}}))

    def no_pickle(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        lowbit.load(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        lowbit.load(tmp_path)
