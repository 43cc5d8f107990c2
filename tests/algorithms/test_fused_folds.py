"""Scale folds across fused projections keep the float function (issue 18, item 3).

For every dense family: a random positive per-channel scale folded into each of the
adapter's groups and pairs (as SmoothQuant and AWQ fold theirs, :func:`fold_scales`) leaves
the model's logits unchanged (1e-5 relative). Phi-3's fused ``qkv_proj``/``gate_up_proj``
and GPT-2's Conv1D ``c_attn`` fold into a *part* of a fused linear: the value rows, the up
rows; scaling the gate rows as well would change the function (tested: the check can fail).
"""

import pytest
import torch

from lowbit.adapters import get_adapter
from lowbit.adapters.base import InputGroup
from lowbit.algorithms.smoothing import fold_scales, weight_2d
from tests.tiny_models import build, calib_ids

FOLD_FAMILIES = ["phi3", "gpt2", "gemma3_mm", "granite", "olmo2", "gemma2", "qwen3", "llama",
                 "opt", "gemma3"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _scale_for(block, g: InputGroup, gen) -> torch.Tensor:
    n = weight_2d(block.get_submodule(g.linears[0])).shape[1]
    return g.tie(torch.rand(n, generator=gen) * 1.5 + 0.25, "amax")


def fold_everything(model, pairs: bool = True) -> list[tuple[str, str]]:
    """Fold a random positive scale into every scale group of every block; returns the
    ``(prev, first linear)`` folded."""
    a = get_adapter(model)
    gen = torch.Generator().manual_seed(3)
    done = []
    for block in a.find_blocks(model)[1]:
        for g in a.scale_groups(block, pairs=pairs):
            fold_scales(block, g, _scale_for(block, g, gen))
            done.append((g.prev if g.prev_part is None else f"{g.prev}:{g.prev_part}",
                         g.linears[0]))
    return done


@pytest.mark.parametrize("family", FOLD_FAMILIES)
def test_random_folds_keep_the_logits(family):
    model = build(family)
    ids = calib_ids(2, 12)
    ref = logits(model, ids)
    done = fold_everything(model)
    assert done, f"{family}: nothing to fold"
    assert rel(logits(model, ids), ref) < 1e-5


def test_scaling_the_gate_rows_too_breaks_the_function():
    """The check can fail: folding the down_proj scale into *all* gate_up rows (the gate
    half included, as a pair without a part would) changes the logits."""
    model = build("phi3")
    ids = calib_ids(2, 12)
    ref = logits(model, ids)
    block = model.model.layers[0]
    s = torch.rand(128, generator=torch.Generator().manual_seed(0)) + 0.5
    wrong = InputGroup(linears=["mlp.down_proj"], prev="mlp.gate_up_proj", prev_kind="linear",
                       channel_map=torch.arange(128))  # the gate rows, not the up rows
    fold_scales(block, wrong, s)
    assert rel(logits(model, ids), ref) > 1e-3


PAIRS = {
    "phi3": [("input_layernorm", ["self_attn.qkv_proj"]),
             ("self_attn.qkv_proj:v", ["self_attn.o_proj"]),
             ("post_attention_layernorm", ["mlp.gate_up_proj"]),
             ("mlp.gate_up_proj:up", ["mlp.down_proj"])],
    "gpt2": [("ln_1", ["attn.c_attn"]), ("attn.c_attn:v", ["attn.c_proj"]),
             ("ln_2", ["mlp.c_fc"])],
    "gemma3_mm": [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj",
                                       "self_attn.v_proj"]),
                  ("self_attn.v_proj", ["self_attn.o_proj"]),
                  ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                  ("mlp.up_proj", ["mlp.down_proj"])],
    "olmo2": [("self_attn.v_proj", ["self_attn.o_proj"]), ("mlp.up_proj", ["mlp.down_proj"])],
}
PAIRS["gemma2"] = PAIRS["gemma3_mm"]
PAIRS["granite"] = PAIRS["qwen3"] = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", ["mlp.down_proj"])]
ADAPTER = {"phi3": "phi3", "gpt2": "gpt2", "gemma3_mm": "gemma3_mm", "olmo2": "olmo2",
           "gemma2": "gemma2", "granite": "granite", "qwen3": "llama"}


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_declared_groups_and_pairs_on_the_tiny_models(family):
    model = build(family)
    a = get_adapter(model)
    assert a.name == ADAPTER[family]
    block = a.find_blocks(model)[1][0]
    got = [(g.prev if g.prev_part is None else f"{g.prev}:{g.prev_part}", g.linears)
           for g in a.scale_groups(block)]
    assert got == PAIRS[family]


def test_phi3_fused_parts_and_channel_maps():
    from lowbit.adapters import fused_parts, fused_projections

    model = build("phi3")
    block = model.model.layers[0]
    assert [f.name for f in fused_projections(model)] == ["self_attn.qkv_proj",
                                                          "mlp.gate_up_proj"]
    # 4 heads of 16, 2 key/value heads: q 64 rows, k 32, v 32
    assert fused_parts(model, block, "self_attn.qkv_proj") == [
        ("q", slice(0, 64)), ("k", slice(64, 96)), ("v", slice(96, 128))]
    assert fused_parts(model, block, "mlp.gate_up_proj") == [("gate", slice(0, 128)),
                                                             ("up", slice(128, 256))]
    groups = {g.prev_part: g for g in get_adapter(model).linear_pairs(block)}
    # o_proj's 64 inputs (4 query heads) read the 2 value heads: heads 0,1 -> v head 0
    vo = groups["v"].channel_map
    assert vo.tolist() == [96 + (c // 16 // 2) * 16 + c % 16 for c in range(64)]
    assert groups["up"].channel_map.tolist() == list(range(128, 256))


def test_unknown_fused_projection_is_refused():
    from lowbit.adapters import fused_parts
    from lowbit.errors import ConfigError

    model = build("phi3")
    with pytest.raises(ConfigError, match=r"'self_attn.o_proj' is not a declared fused "
                                          r"projection \(declared: self_attn.qkv_proj, "
                                          r"mlp.gate_up_proj\)"):
        fused_parts(model, model.model.layers[0], "self_attn.o_proj")


def test_a_channel_map_that_does_not_fit_prev_is_refused():
    from lowbit.errors import ConfigError

    block = build("phi3").model.layers[0]
    bad = InputGroup(linears=["mlp.down_proj"], prev="mlp.gate_up_proj", prev_kind="linear",
                     channel_map=torch.arange(128) + 200)  # rows 200..327 of 256
    with pytest.raises(ConfigError, match=r"mlp.gate_up_proj -> mlp.down_proj: its channel "
                                          r"map \(128 channels up to row 327\) does not fit"):
        fold_scales(block, bad, torch.ones(128))


# --- through lowbit.quantize: every declared group and pair is folded and checked ------------


@pytest.mark.parametrize("family,n_groups", [("phi3", 4), ("gpt2", 3), ("gemma3_mm", 4),
                                             ("granite", 4), ("olmo2", 2)])
@pytest.mark.parametrize("preset", ["int8-smoothquant", "int4-awq"])
def test_quantize_folds_every_declared_group(family, n_groups, preset):
    """SmoothQuant and AWQ fold into every declared group and pair (Phi-3 before fused
    projections were declared: 2 per block, no pair), the fold check passes, and with the
    quantizers off the model computes its float function."""
    import warnings

    import lowbit
    from lowbit import recipes
    from lowbit.adapters import facts
    from lowbit.nn.utils import quantizers
    from tests.tiny_models import loop_over

    model = build(family)
    ids = calib_ids(4, 16)
    ref = logits(model, ids)
    r = recipes.load(preset)
    r = recipes.load(r, exclude=[*r.exclude, *facts.unreached_patterns(model)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, r, forward_loop=loop_over(ids))
    key = "smoothquant_alpha" if preset == "int8-smoothquant" else "awq_alpha"
    rows = model.lowbit_report.blocks
    assert [len(row[key]) for row in rows] == [n_groups, n_groups]
    assert all(row["fold_error"] < 1e-5 for row in rows if row.get("fold_error") is not None)
    for _, q in quantizers(model):
        q.disable()
    assert rel(logits(model, ids), ref) < 1e-5
