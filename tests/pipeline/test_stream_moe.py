"""Streaming quantization of MoE checkpoints: every stored layout of the experts read per
expert, one MoE block in memory at a time, output equal to the in-memory quantization."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit.errors import CheckpointError
from lowbit.export.safe_read import read_checkpoint
from lowbit.pipeline import quantize_checkpoint
from lowbit.pipeline import stream as S
from lowbit.pipeline.source import SafetensorsSource
from tests.moe_models import VOCAB, build_moe
from tests.pipeline.test_stream import assert_same_checkpoint, in_memory, save_src

tf = pytest.importorskip("transformers")
IDS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


# mixtral: block_sparse_moe.experts.E.w1/w3/w2; qwen3_moe/deepseek_v3: mlp.experts.E.*_proj
# (what transformers 5's save_pretrained writes for them); gpt_oss: stacked gate_up_proj
# [E, H, 2I] (transposed, interleaved, biased), read one expert slab at a time
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_stream_moe_equals_in_memory(family, tmp_path):
    src = save_src(build_moe(family), tmp_path / "src")
    res = quantize_checkpoint(src, "int4-gptq", IDS, tmp_path / "stream", group_size=16,
                              chunk_size=4)
    mem = in_memory(src, "int4-gptq", IDS, tmp_path / "mem", group_size=16, chunk_size=4)
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "mem")
    # the routed tokens per expert are reported as lowbit.quantize reports them
    assert res.experts and res.experts == mem.lowbit_report.experts
    assert res.lines()[0].startswith("MoE experts: routed calibration tokens per expert")
    a, b = lowbit.load(tmp_path / "stream"), lowbit.load(tmp_path / "mem")
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)


def _fused_checkpoint(model, path):
    """The model's own state dict (transformers 5 modules: mlp.experts.gate_up_proj
    [E, 2I, H]) as one safetensors file + config.json."""
    path.mkdir()
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              path / "model.safetensors")
    return path


def _moe64(layers=4):
    cfg = tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                            moe_intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=64, num_experts_per_tok=4)
    torch.manual_seed(0)
    return tf.Qwen3MoeForCausalLM(cfg).eval()


def test_64_experts_one_block_in_memory(tmp_path, monkeypatch):
    """Memory probe: the bytes of materialized parameters plus the tensor being read, at
    every read, never exceed the rest (embeddings, head) + one block + one expert's slab;
    the stacked [64, 2I, H] tensors are never read whole."""
    model = _moe64()
    src = _fused_checkpoint(model, tmp_path / "src")
    blocks = model.model.layers
    block_bytes = max(sum(p.numel() * 4 for p in b.parameters()) for b in blocks)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    rest_bytes = model_bytes - sum(p.numel() * 4 for p in blocks.parameters())
    slab = 2 * 64 * 64 * 4  # one expert of gate_up_proj [64, 128, 64] float32
    probe = {"peak": 0, "largest_read": 0, "reads": 0}
    live_model = {}
    real_mat, real_read = S.materialize, SafetensorsSource.read_index

    def mat(m, *a, **k):
        live_model["m"] = m
        return real_mat(m, *a, **k)

    def read_index(self, name, index, *a, **k):
        t = real_read(self, name, index, *a, **k)
        live = sum(p.numel() * p.element_size() for p in live_model["m"].parameters()
                   if p.device.type != "meta")
        probe["peak"] = max(probe["peak"], live + 2 * t.numel() * t.element_size())
        probe["largest_read"] = max(probe["largest_read"], t.numel() * t.element_size())
        probe["reads"] += 1
        return t

    monkeypatch.setattr(S, "materialize", mat)
    monkeypatch.setattr(SafetensorsSource, "read_index", read_index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_checkpoint(src, "int4-weight-only", None, tmp_path / "stream", group_size=32)
    assert probe["reads"] == 4 * 64 * 2  # per expert: gate_up once (gate and up), down
    assert probe["largest_read"] == slab
    assert probe["peak"] <= rest_bytes + block_bytes + 2 * slab
    assert probe["peak"] < 0.3 * model_bytes  # 4 blocks: the model is never in memory
    # the same model quantized in memory, saved: tensor for tensor the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, "int4-weight-only", group_size=32)
    lowbit.save(model, tmp_path / "mem")
    ma, ta, _ = read_checkpoint(tmp_path / "stream")
    mb, tb, _ = read_checkpoint(tmp_path / "mem")
    assert ma == mb and set(ta) == set(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_unmappable_expert_layout_is_refused(tmp_path):
    model = build_moe("qwen3_moe")
    src = _fused_checkpoint(model, tmp_path / "src")
    from safetensors.torch import load_file

    sd = load_file(src / "model.safetensors")
    key = "model.layers.0.mlp.experts.gate_up_proj"
    sd[key.replace("gate_up_proj", "mlp1_blocks")] = sd.pop(key)  # gpt-oss original style
    save_file(sd, src / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.experts.0.gate_proj."
                       r"weight' is missing .*model.layers.0.mlp.experts.gate_up_proj \(st"):
        quantize_checkpoint(src, "int4-weight-only", None, tmp_path / "out", group_size=32)
