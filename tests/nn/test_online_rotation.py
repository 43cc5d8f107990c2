"""Online rotations in modules (lowbit.nn.rotation): input of a quantized linear, queries and
keys after RoPE, a norm's output. Offline W @ R + online R pairs are built by hand here."""

import copy
import pickle

import pytest
import torch
from torch import nn

import lowbit
from lowbit.core.rotation import rotation_matrix
from lowbit.errors import ConfigError
from lowbit.nn import (OnlineRotation, attach_kv_quantizers, attach_rotation, online_rotations,
                       quantize_module)
from lowbit.nn.mha import linear_input
from tests.tiny_models import build, calib_ids, loop_over

IDS = calib_ids(2, 16, seed=3)


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def rotate_down_proj(m, kind="random_hadamard", block=None):
    """Quantized (quantizers off) down_proj with W <- W @ R and the online R."""
    for i, blk in enumerate(m.model.layers):
        name = f"model.layers.{i}.mlp.down_proj"
        d = blk.mlp.down_proj
        quantize_module(d, name=name)
        n = d.in_features
        r = rotation_matrix(kind, block or n, seed=i)
        full = r if block is None else torch.block_diag(*[r] * (n // block))
        with torch.no_grad():
            d.weight.copy_((d.weight.double() @ full).float())
        attach_rotation(m, name, "input", OnlineRotation(r, kind, n, i, block))


def qk(m, matrix_of, kind="random"):
    for i, _ in enumerate(m.model.layers):
        r = matrix_of(i)
        attach_rotation(m, f"model.layers.{i}.self_attn", "qk",
                        OnlineRotation(r, kind, r.shape[0], None))


@pytest.mark.parametrize("block", [None, 32])
def test_input_rotation_pair_keeps_function(block):
    m = build("llama")
    ref = logits(m)
    rotate_down_proj(m, block=block)
    assert rel(logits(m), ref) < 1e-5
    rots = online_rotations(m)
    assert rots["model.layers.0.mlp.down_proj"] == {
        "where": "input", "kind": "random_hadamard", "size": 128, "seed": 0, "block": block}


def test_input_rotation_is_applied_before_the_input_quantizer():
    lin = quantize_module(nn.Linear(32, 8), name="lin")
    seen = []
    lin.input_quantizer.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    r = torch.randn(32, 32)
    lin.input_rotation = OnlineRotation(r, "matrix", 32)
    x = torch.randn(3, 32)
    with torch.no_grad():
        y = lin(x)
    assert torch.allclose(seen[0], x @ r, atol=1e-5)
    assert torch.allclose(y, (x @ r) @ lin.weight.T + lin.bias, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_qk_rotation_keeps_function_and_is_applied(family, impl):
    m = build(family)
    m.config._attn_implementation = impl
    ref = logits(m)
    hd = m.model.layers[0].self_attn.head_dim
    qk(m, lambda i: rotation_matrix("random", hd, seed=i).float())
    assert rel(logits(m), ref) < 1e-5
    # a non-orthogonal matrix changes the scores: the rotation really runs
    qk(m, lambda i: 2 * torch.eye(hd), kind="matrix")
    assert rel(logits(m), ref) > 1e-3


def test_qk_rotation_comes_before_the_kv_quantizers():
    m = build("llama")
    attach_kv_quantizers(m, lowbit.config.QuantSpec.parse({"format": "int8"}, "kv"))
    seen = []

    class Record(nn.Module):
        def forward(self, t):
            seen.append(t)
            return t

    for blk in m.model.layers:  # the int8 quantizers replaced by recorders
        blk.self_attn.k_cache_quantizer, blk.self_attn.v_cache_quantizer = Record(), Record()
    logits(m)
    k0 = seen[0]
    seen.clear()
    r = rotation_matrix("random", 16, seed=1).float()
    attach_rotation(m, "model.layers.0.self_attn", "qk", OnlineRotation(r, "random", 16, 1))
    logits(m)
    assert torch.allclose(seen[0], k0 @ r, atol=1e-5)


def test_norm_output_rotation_pair_keeps_function_and_survives_copies():
    m = build("llama")
    ref = logits(m)
    r1 = rotation_matrix("hadamard", 64)
    attach_rotation(m, "model.norm", "norm_output", OnlineRotation(r1, "hadamard", 64, 0))
    with torch.no_grad():
        m.lm_head.weight.copy_((m.lm_head.weight.double() @ r1).float())
    assert rel(logits(m), ref) < 1e-5
    attach_rotation(m, "model.norm", "norm_output", OnlineRotation(r1, "hadamard", 64, 0))
    assert len(m.model.norm._forward_hooks) == 1  # replaced, not hooked twice
    assert rel(logits(copy.deepcopy(m)), ref) < 1e-5
    assert rel(logits(pickle.loads(pickle.dumps(m))), ref) < 1e-5
    assert online_rotations(m) == {"model.norm": {"where": "norm_output", "kind": "hadamard",
                                                  "size": 64, "seed": 0, "block": None}}


def test_linear_input_sees_the_rotated_input():
    m = build("llama")
    rotate_down_proj(m)
    d = m.model.layers[0].mlp.down_proj
    got, raw = [], []

    def hook(mod, a, k):
        raw.append(a[0])
        got.append(linear_input(mod, a, k, "down"))

    d.register_forward_pre_hook(hook, with_kwargs=True)
    logits(m)
    assert torch.allclose(got[0], d.input_rotation(raw[0]))
    assert not torch.allclose(got[0], raw[0])


def test_nothing_when_absent():
    m = build("llama")
    lowbit.quantize(m, "int8-dynamic", forward_loop=loop_over(calib_ids(2, 8)))
    d = m.model.layers[0].mlp.down_proj
    assert not hasattr(d, "input_rotation")
    assert "input_rotation" not in d._modules
    assert not any("rotation" in k for k in m.state_dict())
    assert online_rotations(m) == {}


def test_casts_keep_the_matrix_float32():
    m = build("llama")
    rotate_down_proj(m)
    m.to(torch.bfloat16)
    assert m.model.layers[0].mlp.down_proj.input_rotation.matrix.dtype == torch.float32
    assert m.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert logits(m).dtype == torch.bfloat16


def test_refusals():
    m = build("llama")
    r = OnlineRotation(torch.eye(128), "hadamard", 128)
    with pytest.raises(ConfigError, match="model.layers.0.mlp.down_proj.*quantize the layer"):
        attach_rotation(m, "model.layers.0.mlp.down_proj", "input", r)
    quantize_module(m.model.layers[0].mlp.up_proj, name="up")
    with pytest.raises(ConfigError, match="width 128, the layer reads 64"):
        attach_rotation(m, "model.layers.0.mlp.up_proj", "input", r)
    with pytest.raises(ConfigError, match="where 'output'"):
        attach_rotation(m, "model.norm", "output", r)
    with pytest.raises(ConfigError, match="not a norm"):
        attach_rotation(m, "model.layers.0.mlp", "norm_output", r)
    with pytest.raises(ConfigError, match="heads are 16 wide"):
        attach_rotation(m, "model.layers.0.self_attn", "qk", r)
    with pytest.raises(ConfigError, match="no module 'nope'"):
        attach_rotation(m, "nope", "qk", r)
    conv = nn.Sequential(nn.Conv2d(4, 4, 1))
    quantize_module(conv[0], name="0")
    with pytest.raises(ConfigError, match="Conv2d"):
        attach_rotation(conv, "0", "input", OnlineRotation(torch.eye(4), "hadamard", 4))
    with pytest.raises(ConfigError, match="expected shape \\[32, 32\\]"):
        OnlineRotation(torch.eye(64), "hadamard", 128, block=32)
    with pytest.raises(ConfigError, match="kind 'qr'"):
        OnlineRotation(torch.eye(4), "qr", 4)


def test_qk_refused_without_shared_attention_functions():
    class MyAttention(nn.Module):
        head_dim = 4

        def __init__(self):
            super().__init__()
            self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return x

    m = nn.Sequential(MyAttention())
    with pytest.raises(ConfigError, match="module '0' \\(MyAttention\\).*shared attention"):
        attach_rotation(m, "0", "qk", OnlineRotation(torch.eye(4), "hadamard", 4))
    assert "qk_rotation" not in m[0]._modules


def test_gpt2_conv1d_input_rotation_pair_keeps_function():
    m = build("gpt2")
    ref = logits(m)
    c = m.transformer.h[0].mlp.c_proj  # Conv1D, weight [in 256, out 64]
    quantize_module(c, name="transformer.h.0.mlp.c_proj")
    r = rotation_matrix("hadamard", 256)
    with torch.no_grad():
        c.weight.copy_((r.T @ c.weight.double()).float())  # (x R)(R^T W) = x W
    attach_rotation(m, "transformer.h.0.mlp.c_proj", "input",
                    OnlineRotation(r, "hadamard", 256, 0))
    assert rel(logits(m), ref) < 1e-5
    c._modules["input_rotation"] = None  # without it the function changes: it was applied
    assert rel(logits(m), ref) > 1e-3
