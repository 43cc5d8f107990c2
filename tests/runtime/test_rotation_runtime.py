"""Online rotations survive save -> load (plain and packed) -> runtime (convert, FastDecoder).

The rotations here are arbitrary (non-orthogonal) matrices: a rotation dropped anywhere on
the way changes the logits, so equal logits prove it was carried and applied."""

import json

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.errors import CheckpointError
from lowbit.nn import OnlineRotation, attach_rotation, online_rotations
from lowbit.runtime import FastDecoder, PackedLinear, fuse_linears
from tests.tiny_models import build, calib_ids, loop_over

IDS = calib_ids(2, 16, seed=3)


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().detach())


def mat(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n ** 0.5


def rotated(family="llama", recipe="nvfp4", all_inputs=False, **kw):
    """A quantized tiny model with input rotations (down_proj full, every other linear
    block-diagonal 16 when ``all_inputs``), q/k rotations and the final norm's output
    rotation."""
    m = build(family)
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(4, 24)), **kw)
    for i, blk in enumerate(m.model.layers):
        p = f"model.layers.{i}"
        attach_rotation(m, f"{p}.mlp.down_proj", "input",
                        OnlineRotation(mat(128, i), "matrix", 128))
        hd = blk.self_attn.head_dim
        attach_rotation(m, f"{p}.self_attn", "qk", OnlineRotation(mat(hd, 10 + i), "matrix", hd))
        if hasattr(blk, "post_feedforward_layernorm"):  # Gemma's sandwich post-norms
            for n in ("post_attention_layernorm", "post_feedforward_layernorm"):
                attach_rotation(m, f"{p}.{n}", "norm_output",
                                OnlineRotation(mat(64, 30 + i), "matrix", 64))
        if all_inputs:
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "mlp.gate_proj", "mlp.up_proj"):
                attach_rotation(m, f"{p}.{n}", "input",
                                OnlineRotation(mat(16, 20 + i), "matrix", 64, None, 16))
    attach_rotation(m, "model.norm", "norm_output", OnlineRotation(mat(64, 99), "matrix", 64))
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = rotated()
    path = tmp_path_factory.mktemp("rot") / "ckpt"
    lowbit.save(m, path)
    return m, path


def test_native_round_trip_is_exact(saved):
    m, path = saved
    meta = json.loads((path / "lowbit_checkpoint.json").read_text())
    assert meta["online_rotations"] == online_rotations(m)
    assert len(meta["online_rotations"]) == 5
    back = lowbit.load(path)
    assert online_rotations(back) == online_rotations(m)
    assert torch.equal(logits(back), logits(m))


def test_with_a_quantized_kv_cache(tmp_path):
    m = rotated(recipe="fp8", kv_cache="fp8")
    assert hasattr(m.model.layers[0].self_attn, "k_cache_quantizer")
    lowbit.save(m, tmp_path / "ckpt")
    for packed in (False, True):
        back = lowbit.load(tmp_path / "ckpt", packed=packed)
        assert online_rotations(back) == online_rotations(m)
        assert rel(logits(back), logits(m)) < 1e-5


def test_packed_load_applies_input_rotations(saved):
    m, path = saved
    back = lowbit.load(path, packed=True)
    d = back.model.layers[0].mlp.down_proj
    assert isinstance(d, PackedLinear) and d.input_rotation.size == 128
    assert online_rotations(back) == online_rotations(m)
    assert rel(logits(back), logits(m)) < 1e-5


def test_convert_carries_input_rotations():
    m = rotated(all_inputs=True)
    ref = logits(m)
    rt.convert(m)
    assert isinstance(m.model.layers[1].mlp.down_proj, PackedLinear)
    assert rel(logits(m), ref) < 1e-5


def test_a_checkpoint_without_the_metadata_is_refused(saved, tmp_path):
    _, path = saved
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    meta = json.loads((bad / "lowbit_checkpoint.json").read_text())
    del meta["online_rotations"]
    (bad / "lowbit_checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="rotation.*not in"):
        lowbit.load(bad)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_fast_decoder_applies_every_rotation(family, tmp_path):
    m = rotated(family, all_inputs=True)
    lowbit.save(m, tmp_path / "ckpt")
    back = lowbit.load(tmp_path / "ckpt", packed={"act_dtype": torch.float32})
    ids = IDS[0]
    ref = logits(back)[0]
    dec = FastDecoder(back)
    with torch.no_grad():
        assert rel(dec.forward(ids, 0, all_logits=True), ref) < 1e-4
        # through the cache: a prefix, then token by token
        a = dec.forward(ids[:9], 0, all_logits=True)
        steps = [dec.forward(ids[i:i + 1], i)[None] for i in range(9, 16)]
        assert rel(torch.cat([a] + steps), ref) < 1e-4
        # an explicit mask: generate would otherwise mask prompt tokens equal to pad id 0
        hf = back.generate(ids[None], attention_mask=torch.ones_like(ids[None]),
                           max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(ids, 6), hf)


def test_fuse_linears_keeps_layers_with_input_rotations_apart():
    m = rotated(recipe="int4-weight-only", all_inputs=True)
    rt.convert(m)
    a = m.model.layers[0].self_attn
    fused = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
    assert fused.mode == "split"
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(fused(x), torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1))
