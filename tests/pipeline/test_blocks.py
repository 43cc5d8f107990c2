"""The block runner: one block's activations at a time; captured inputs; presets end to end."""

import gc
import weakref

import pytest
import torch

import lowbit
from lowbit.pipeline import blocks as B
from tests.tiny_models import build, calib_ids, loop_over


def test_holds_one_block_of_activations(monkeypatch):
    """Outputs are weakly tracked: while block i runs, nothing computed for block i-2 or
    earlier is alive, and of block i-1's outputs only one set (block i's inputs) is."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).eval()
    index = {id(b): i for i, b in enumerate(model.model.layers)}
    ids = calib_ids(6, 16)
    alive: list[tuple[int, list[weakref.ref]]] = []
    orig = B.run_block

    def spy(block, inputs):
        gc.collect()
        cur = index[id(block)]
        for i, refs in alive:
            if i <= cur - 2:
                assert all(r() is None for r in refs), (i, cur)
        live_prev = [refs for i, refs in alive if i == cur - 1 and any(r() is not None for r in refs)]
        assert len(live_prev) <= 1
        outs = orig(block, inputs)
        alive.append((cur, [weakref.ref(o) for o in outs]))
        return outs

    monkeypatch.setattr(B, "run_block", spy)
    lowbit.quantize(model, "int8-smoothquant", forward_loop=loop_over(ids))
    assert {i for i, _ in alive} == {0, 1, 2, 3}


def test_capture_first_block_inputs_stops_early():
    model = build("llama")
    ids = calib_ids(3, 16)
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    from lowbit.adapters import find_blocks

    _, blocks = find_blocks(model)
    got = B.capture_first_block_inputs(model, blocks[0], loop_over(ids))
    h.remove()
    assert len(got) == 3 and not calls  # the head never ran
    assert got[0][0][0].shape == (1, 16, 64) or got[0][1]["hidden_states"].shape == (1, 16, 64)


@pytest.mark.parametrize("preset", ["int4-awq", "int4-gptq", "int4-gptq-actorder",
                                    "int8-smoothquant", "nvfp4-awq", "w4a8-awq"])
def test_algorithm_presets_end_to_end(preset):
    model = build("llama")
    ids = calib_ids(4, 16)
    rows = []
    lowbit.quantize(model, preset, forward_loop=loop_over(ids), group_size=32,
                    progress=lambda i, n, name: rows.append((i, n, name)))
    assert [r[0] for r in rows] == [1, 2]
    assert torch.isfinite(model(ids[:1]).logits).all()
    assert len(model.lowbit_report.blocks) == 2
