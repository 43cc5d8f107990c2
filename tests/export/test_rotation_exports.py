"""Exports of rotated models (issue 21, contract section 5).

Offline rotations are plain weights in every format. Online rotations
(:mod:`lowbit.nn.rotation`) are written as compressed-tensors transforms
(``quantization_config.transform_config``, weights ``<module>.<scheme>_<location>.weight``),
as explicit ``MatMul`` nodes with a constant matrix in ONNX, and refused by GGUF.

The compressed-tensors reader used here is the real loading path available on a CPU:
transformers' ``from_pretrained`` (which loads the quantized weights but, in transformers
5.24, does not read ``transform_config``) followed by compressed-tensors' own
``apply_transform_config`` and the checkpoint's transform weights, as a reader that
supports transforms (vLLM, llm-compressor) attaches them.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.core.rotation import rotate_last, rotation_matrix
from lowbit.errors import ConfigError
from lowbit.nn.rotation import OnlineRotation, attach_rotation, online_rotations
from tests.tiny_models import build, calib_ids, loop_over

IDS = calib_ids(2, 24, seed=7)
W4A8 = {"name": "w4a8-g32", "targets": [{"pattern": "*",
        "weight": {"format": "int4", "granularity": "group", "group_size": 32},
        "input": {"format": "fp8_e4m3", "granularity": "tensor"}}]}
Q8_0 = {"name": "q8_0", "targets": [{"pattern": "*", "weight": {
    "format": "int8", "granularity": "group", "group_size": 32, "scale_format": "fp16"}}]}
W8A8 = {"name": "w8a8-static", "targets": [{"pattern": "*",
        "weight": {"format": "int8", "granularity": "channel"},
        "input": {"format": "int8", "granularity": "tensor"}}]}


def _rotate(recipe, args):
    return dict(recipe, algorithms=[{"name": "rotate", "args": args}])


def quantized(recipe, family="llama"):
    m = build(family)
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(6, 24)))
    return m


def with_block_rotation(m, name="model.layers.0.self_attn.q_proj", block=32, seed=1):
    """A block-diagonal ``random_hadamard`` input rotation on one quantized linear, by hand
    (weight rotated offline, input online), so that the model's function is unchanged."""
    r = rotation_matrix("random_hadamard", block, seed=seed)
    lin = m.get_submodule(name)
    with torch.no_grad():
        lin.weight.copy_(rotate_last(lin.weight.double(), r).float())
    attach_rotation(m, name, "input", OnlineRotation(r, "random_hadamard", lin.in_features,
                                                     seed, block))
    return m


@torch.no_grad()
def logprobs(m, ids=IDS):
    return torch.log_softmax(m(ids).logits.float(), -1)


# --- compressed-tensors ---------------------------------------------------------------------
ct = pytest.importorskip("compressed_tensors")


def ct_load(path, apply=True, dtype=torch.float32):
    """The exported directory through transformers + compressed-tensors' transforms."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import AutoModelForCausalLM

    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    # the only tensors transformers 5.24 leaves: the transform weights
    names = set(info["unexpected_keys"])
    assert all(".online_" in k or ".R3_" in k for k in names), names
    if apply and cfg["transform_config"]:
        apply_transform_config(m, TransformConfig.model_validate(cfg["transform_config"]))
        sd = load_file(path / "model.safetensors")
        res = m.load_state_dict({k: sd[k] for k in names}, strict=False)
        assert not res.unexpected_keys, res.unexpected_keys
    return m, cfg


def test_ct_r4_and_block_rotations_reload(tmp_path):
    m = with_block_rotation(quantized(_rotate(W4A8, {"r1": True, "r2": True, "r4": True})))
    rots = online_rotations(m)
    assert {s["where"] for s in rots.values()} == {"input"} and len(rots) == 3
    lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    m2, cfg = ct_load(tmp_path / "ct")
    groups = cfg["transform_config"]["config_groups"]
    by_target = {t: (g, a["location"]) for g in groups.values() for a in g["apply"]
                 for t in a["targets"]}
    down, bq = by_target["model.layers.0.mlp.down_proj"], \
        by_target["model.layers.0.self_attn.q_proj"]
    assert down[1] == bq[1] == "input"
    assert down[0]["type"] == "hadamard" and down[0]["head_dim"] is None  # Sylvester 128
    assert bq[0]["type"] == "random-hadamard" and bq[0]["head_dim"] == 32
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    assert not any(k.endswith("input_rotation.matrix") for k in sd)
    d = (logprobs(m) - logprobs(m2)).abs().max().item()
    print(f"max |log-prob difference| with transforms: {d:.2e}")
    assert d < 1e-4
    m3, _ = ct_load(tmp_path / "ct", apply=False)  # the test can fail: transforms matter
    assert (logprobs(m) - logprobs(m3)).abs().max().item() > 1e-3


def test_ct_export_of_a_reloaded_native_checkpoint(tmp_path):
    """``lowbit export DIR --format compressed-tensors``: lowbit.load re-attaches the online
    rotations, which then reach the compressed-tensors checkpoint."""
    m = with_block_rotation(quantized(_rotate(W4A8, {"r1": True, "r2": True, "r4": True})))
    lowbit.save(m, tmp_path / "native")
    m1 = lowbit.load(tmp_path / "native")
    assert online_rotations(m1) == online_rotations(m)
    lowbit.save(m1, tmp_path / "ct", format="compressed-tensors")
    m2, _ = ct_load(tmp_path / "ct")
    assert (logprobs(m) - logprobs(m2)).abs().max().item() < 1e-4


def test_ct_learned_matrix_stored_exactly(tmp_path):
    """A non-Hadamard matrix (random orthogonal, as SpinQuant's) as a stored weight."""
    m = quantized(W4A8)
    r = rotation_matrix("random", 128, seed=5)
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj"
        lin = m.get_submodule(name)
        with torch.no_grad():
            lin.weight.copy_((lin.weight.double() @ r).float())
        attach_rotation(m, name, "input", OnlineRotation(r, "matrix", 128))
    lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    m2, cfg = ct_load(tmp_path / "ct")
    (g,) = cfg["transform_config"]["config_groups"].values()  # one shared matrix
    assert g["type"] == "random-hadamard" and len(g["apply"][0]["targets"]) == 2
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    w = sd["model.layers.1.mlp.down_proj.online_0_input.weight"]
    assert torch.allclose(w.double() / 128 ** 0.5, r, atol=1e-6)
    assert (logprobs(m) - logprobs(m2)).abs().max().item() < 1e-4


@pytest.mark.parametrize("n", [1, 2, 16, 32, 64, 128, 1024])
def test_lowbit_hadamard_is_compressed_tensors_sylvester(n):
    """Type ``hadamard`` (the reader builds the matrix) only where lowbit's is the same."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    from lowbit.core.rotation import hadamard_matrix
    from lowbit.export.compressed_tensors import _sylvester

    h = deterministic_hadamard_matrix(n, torch.float64)
    assert torch.equal(hadamard_matrix(n) * n ** 0.5, h) or torch.allclose(
        hadamard_matrix(n) * n ** 0.5, h, atol=1e-12)
    assert torch.equal(_sylvester(n), h)


def reader_rotates_keys() -> bool:
    """Whether compressed-tensors' key hook reaches the installed transformers' attention:
    it replaces the ``past_key_value(s)`` argument, which transformers >= 5.24 renamed
    ``cache`` (so keys stay unrotated while queries are rotated)."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaAttention

    params = inspect.signature(LlamaAttention.forward).parameters
    return "past_key_values" in params or "past_key_value" in params


def test_ct_r3_written_as_q_attn_and_k_cache(tmp_path, monkeypatch):
    m = quantized(_rotate(W4A8, {"r1": True, "r2": True, "r3": True, "r4": False}))
    assert {s["where"] for s in online_rotations(m).values()} == {"qk"}
    lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (g,) = cfg["transform_config"]["config_groups"].values()
    assert g["head_dim"] == 16 and g["type"] == "hadamard"
    assert [a["location"] for a in g["apply"]] == ["q_attn", "k_cache"]
    assert g["apply"][0]["targets"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    assert sd["model.layers.1.self_attn.R3_0_k_cache.weight"].shape == (16, 16)
    if not reader_rotates_keys():
        # compressed-tensors 0.20.1 looks for past_key_value(s); give its key hook the
        # argument transformers >= 5.24 passes (what a fixed reader does), so that the
        # checkpoint's q_attn/k_cache transforms are checked all the same
        import compressed_tensors.modeling.kvcache as kvc

        def hook(module, args, kwargs):
            cache = getattr(module, kvc.KV_CACHE_ATTR)
            cache.add_past_key_values(kwargs.get("cache"))
            kwargs["cache"] = cache
            return args, kwargs

        monkeypatch.setattr(kvc, "_kv_cache_attention_hook", hook)
    m2, _ = ct_load(tmp_path / "ct")
    calls = []
    for loc in ("q_attn", "k_cache"):  # both run (one alone changes q . k: the test fails)
        m2.model.layers[1].self_attn.get_submodule(f"R3_0_{loc}").register_forward_hook(
            lambda mod, a, out, loc=loc: calls.append(loc))
    d = (logprobs(m) - logprobs(m2)).abs().max().item()
    print(f"max |log-prob difference|: {d:.2e}")
    assert d < 1e-4 and sorted(calls) == ["k_cache", "q_attn"]


def test_ct_mr_gptq_block_step_reloads(tmp_path):
    """The rotate step's block rotation (every quantized linear; composed with R4 into one
    full matrix on down_proj) through the reader."""
    m = quantized(_rotate(W4A8, {"r1": True, "r2": True, "r4": True, "block": 32}))
    kinds = {s["where"] for s in online_rotations(m).values()}
    assert kinds == {"input"}
    lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    m2, cfg = ct_load(tmp_path / "ct")
    groups = cfg["transform_config"]["config_groups"].values()
    assert {g["head_dim"] for g in groups} == {None, 32}
    d = (logprobs(m) - logprobs(m2)).abs().max().item()
    print(f"max |log-prob difference|: {d:.2e}")
    assert d < 1e-4


@pytest.mark.parametrize("preset,tol", [("nvfp4-rotated", 0.15), ("mxfp4-rotated", 0.4),
                                        ("w4a8-rotated", 0.06)])
def test_ct_rotated_presets_reload_in_bfloat16(preset, tol, tmp_path):
    """The rotated presets (bfloat16, as NVFP4/MXFP4 checkpoints are): the tolerances of
    tests/export/test_compressed_tensors.py, where compressed-tensors quantizes bfloat16
    activations its own way."""
    m = build("llama")
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16)
    lowbit.quantize(m, preset, forward_loop=loop_over(calib_ids(6, 24)))
    assert online_rotations(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bfloat16 scales of w4a8: stated by the export
        lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    m2, _ = ct_load(tmp_path / "ct", dtype=torch.bfloat16)  # transforms: float32
    d = (logprobs(m) - logprobs(m2)).abs().max().item()
    print(f"{preset}: max |log-prob difference| {d:.3f}")
    assert d < tol


def test_ct_norm_output_rotation_refused(tmp_path):
    m = quantized(_rotate(W4A8, {"r1": True, "r2": True, "r4": False}), "gemma3")
    name = "model.layers.0.post_attention_layernorm"
    assert online_rotations(m)[name]["where"] == "norm_output"
    with pytest.raises(ConfigError, match=f"{name}: online rotation of a norm's output"):
        lowbit.save(m, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


# --- GGUF -----------------------------------------------------------------------------------
def test_gguf_refuses_online_rotations(tmp_path):
    pytest.importorskip("gguf")
    m = quantized(_rotate(Q8_0, {"r1": True, "r2": True, "r4": True}))
    with pytest.raises(ConfigError, match=r"GGUF has no operation for an online rotation "
                       r"\(model\.layers\.0\.mlp\.down_proj: input rotation.*r1/r2"):
        lowbit.save(m, tmp_path / "g", format="gguf")


def test_gguf_offline_rotations_export_and_read_back(tmp_path):
    gguf = pytest.importorskip("gguf")
    from tests.export.test_gguf import _check_exact, _deq

    m = build("llama")
    m.config.tie_word_embeddings = True  # tied: the rotate step unties (clone)
    m.lm_head.weight = m.model.embed_tokens.weight
    ref = logprobs(m)
    lowbit.quantize(m, _rotate(Q8_0, {"r1": True, "r2": True, "r4": False}),
                    forward_loop=loop_over(calib_ids(4, 24)))
    assert online_rotations(m) == {}
    assert not m.config.tie_word_embeddings
    assert torch.equal(m.model.norm.weight, torch.ones(64))  # folded into the LM head
    assert (logprobs(m) - ref).abs().max().item() < 0.1  # Q8_0 of a rotated model
    r = gguf.GGUFReader(lowbit.save(m, tmp_path / "g", format="gguf") / "model.gguf")
    assert _check_exact(m, r) == {"Q8_0": 14}
    t = {x.name: x for x in r.tensors}
    assert torch.equal(_deq(t["output.weight"]).reshape(128, 64), m.lm_head.weight)
    assert torch.equal(_deq(t["token_embd.weight"]).reshape(128, 64),
                       m.model.embed_tokens.weight)
    assert torch.equal(_deq(t["blk.1.ffn_norm.weight"]).reshape(64), torch.ones(64))


# --- ONNX QDQ -------------------------------------------------------------------------------
def test_onnx_rotations_are_named_matmuls_before_the_input_qdq(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = with_block_rotation(quantized(_rotate(W8A8, {"r1": True, "r2": True, "r3": True,
                                                     "r4": True})))
    out = lowbit.save(m, tmp_path / "o", format="onnx", example_inputs=(IDS,),
                      example_kwargs={"use_cache": False})
    mp = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in mp.graph.initializer}
    nodes = {n.name: n for n in mp.graph.node}
    users = {}
    for n in mp.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def next_ops(node):
        return [u.op_type for u in users.get(node.output[0], [])]

    for i in range(2):
        d = nodes[f"model.layers.{i}.mlp.down_proj.input_rotation"]
        assert d.op_type == "MatMul" and d.input[1] in inits
        assert list(inits[d.input[1]].dims) == [128, 128]
        assert next_ops(d) == ["QuantizeLinear"]  # rotated, then quantized
        for k in ("", "/1"):  # queries and keys
            assert nodes[f"model.layers.{i}.self_attn.qk_rotation{k}"].op_type == "MatMul"
    b = nodes["model.layers.0.self_attn.q_proj.input_rotation"]  # block 32: a [.., 2, 32] view
    assert list(inits[b.input[1]].dims) == [32, 32]
    assert next_ops(b) == ["Reshape"] and next_ops(users[b.output[0]][0]) == ["QuantizeLinear"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: IDS.numpy()})[0]
    d = (torch.log_softmax(torch.from_numpy(got).float(), -1) - logprobs(m)).abs().max().item()
    print(f"onnxruntime vs lowbit, max |log-prob difference|: {d:.2e}")
    assert d < 1e-4


def test_transform_config_without_the_library_equals_its_dump(monkeypatch):
    """lowbit's copy of the TransformConfig dump (used without compressed-tensors) is what
    the library writes, and the types it lists are the library's."""
    from lowbit.export import ct_schema

    groups = {"online_0": {"type": "random-hadamard", "head_dim": 32, "apply": [
        {"targets": ["model.layers.0.self_attn.q_proj"], "location": "input"}]},
              "R3_1": {"type": "hadamard", "head_dim": 16, "apply": [
                  {"targets": ["a"], "location": "q_attn"},
                  {"targets": ["a"], "location": "k_cache"}]}}
    with_lib, types = ct_schema.transform_config(groups), ct_schema.transform_types()
    monkeypatch.setattr(ct_schema, "library", lambda: None)
    assert ct_schema.transform_config(groups) == with_lib
    assert sorted(ct_schema.transform_types()) == sorted(types)


def test_onnx_rotation_missing_from_the_graph_is_an_error(tmp_path, monkeypatch):
    """If the traced graph had no MatMul for a rotation (here: the module scopes are
    hidden), the export fails naming the module instead of writing an unrotated model."""
    pytest.importorskip("onnx")
    from lowbit.export import onnx_qdq

    m = quantized(_rotate(W8A8, {"r1": True, "r2": True, "r4": True}))
    monkeypatch.setattr(onnx_qdq, "_scope_of", lambda node: "")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj \(input\).*"
                       r"found 0"):
        lowbit.save(m, tmp_path / "o", format="onnx", example_inputs=(IDS,),
                    example_kwargs={"use_cache": False})
    assert not (tmp_path / "o").exists()
