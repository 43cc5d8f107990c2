"""Adapters and SmoothQuant: folding keeps the FP function; smoothing helps W8A8."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.adapters import GENERIC, find_blocks, get_adapter, groups_by_inspection
from lowbit.algorithms import fold_scales, smoothquant_scales
from lowbit.nn import disable_quantizers
from tests.tiny_models import build, calib_ids, loop_over


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared CPU: threads only add contention
    yield
    torch.set_num_threads(n)


def block_inputs(model, ids):
    _, blocks = find_blocks(model)
    seen = {}
    h = blocks[0].register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k),
                                            with_kwargs=True)
    model(ids, use_cache=False)
    h.remove()
    return blocks, seen["a"], seen["k"]


def fp_error(model, ids, ref):
    """Relative error of the model with every quantizer disabled against ``ref``."""
    disable_quantizers(model)
    for m in model.modules():
        if hasattr(m, "invalidate_weight_cache"):
            m.invalidate_weight_cache()
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).norm() / ref.norm())


def llama_mha():
    """Tiny Llama without grouped-query attention (so v_proj -> o_proj can fold)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("family,name", [("llama", "llama"), ("qwen2", "llama"),
                                         ("gemma3", "gemma2"), ("gpt2", "gpt2"),
                                         ("opt", "opt")])
def test_registered_adapters_match_inspection(family, name):
    """Each family's declarative groups are what a forward pass with hooks finds."""
    model = build(family)
    a = get_adapter(model)
    assert a.name == name
    blocks, args, kwargs = block_inputs(model, calib_ids()[:1])
    assert len(blocks) == 2
    declared = {(g.prev, tuple(g.linears)) for g in a.input_groups(blocks[0])}
    found = {(g.prev, tuple(g.linears)) for g in groups_by_inspection(blocks[0], args, kwargs)
             if g.prev is not None}
    assert declared == found


def test_generic_adapter_for_an_unregistered_model():
    model = build("llama")
    model.config.model_type = "something-new"
    a = get_adapter(model)
    assert a is GENERIC
    assert a.find_blocks(model)[0] == "model.layers"
    blocks, args, kwargs = block_inputs(model, calib_ids()[:1])
    groups = a.scale_groups(blocks[0], args, kwargs)
    assert [g.linears for g in groups] == [["self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj"], ["mlp.gate_proj",
                                                                  "mlp.up_proj"]]
    assert get_adapter(nn.Sequential(nn.Linear(4, 4))) is None


def test_pairs_and_grouped_query_attention():
    """v_proj -> o_proj folds with grouped-query attention too: the query heads that share a
    value head share its scales (channel map); up_proj -> down_proj maps one to one."""
    gqa, mha = build("llama"), llama_mha()
    expect = [("self_attn.v_proj", ["self_attn.o_proj"]), ("mlp.up_proj", ["mlp.down_proj"])]
    for model in (gqa, mha):
        blocks = find_blocks(model)[1]
        pairs = get_adapter(model).linear_pairs(blocks[0])
        assert [(p.prev, p.linears) for p in pairs] == expect
        assert pairs[1].channel_map is None
    vo = get_adapter(gqa).linear_pairs(find_blocks(gqa)[1][0])[0]
    # 4 query heads, 2 key/value heads of 16: heads 0, 1 read value head 0; 2, 3 head 1
    assert vo.channel_map.tolist() == [*range(16), *range(16), *range(16, 32), *range(16, 32)]
    v = torch.arange(64.0)
    assert vo.tie(v).tolist() == [*range(16, 32), *range(16, 32), *range(48, 64), *range(48, 64)]
    assert vo.tie(v, "mean")[:16].tolist() == [8.0 + i for i in range(16)]


@pytest.mark.parametrize("family", ["llama", "mha", "gpt2", "opt", "gemma3", "qwen3"])
def test_folding_random_scales_keeps_fp_outputs(family):
    model = llama_mha() if family == "mha" else build(family)
    ids = calib_ids()
    with torch.no_grad():
        ref = model(ids).logits
    blocks, args, kwargs = block_inputs(model, ids[:1])
    g = torch.Generator().manual_seed(1)
    n = 0
    for block in blocks:
        for grp in get_adapter(model).scale_groups(block, args, kwargs):
            m = block.get_submodule(grp.linears[0])
            n_in = m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1]
            fold_scales(block, grp, grp.tie(torch.rand(n_in, generator=g) * 3 + 0.2))
            n += 1
    assert n >= 4
    if family in ("llama", "mha", "qwen3"):
        assert n == 8  # q/k/v, v -> o, gate/up, up -> down in both blocks
    with torch.no_grad():
        out = model(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_smoothquant_scales_formula():
    xmax = torch.tensor([1.0, 4.0, 9.0])
    wmax = torch.tensor([4.0, 1.0, 1.0])
    s = smoothquant_scales(xmax, wmax, 0.5)
    assert torch.allclose(s, torch.tensor([0.5, 2.0, 3.0]))
    assert torch.allclose(smoothquant_scales(xmax, wmax, 1.0), xmax)


@pytest.mark.parametrize("family", ["llama", "mha", "opt", "gpt2"])
@pytest.mark.parametrize("args", [{}, {"search": True, "grid": 4}, {"pairs": False}])
def test_smoothquant_keeps_the_fp_function(family, args):
    model = llama_mha() if family == "mha" else build(family)
    ids = calib_ids(6, 16)
    with torch.no_grad():
        ref = model(ids).logits
    r = lowbit.recipes.load("int8-smoothquant")
    d = r.to_dict()
    d["algorithms"][0]["args"].update(args)
    lowbit.quantize(model, d, forward_loop=loop_over(ids))
    rows = model.lowbit_report.blocks
    assert len(rows) == 2 and all(r["smoothquant_alpha"] for r in rows)
    if args.get("search"):
        assert all(a in (0.25, 0.5, 0.75, 1.0) for r in rows for a in r["smoothquant_alpha"])
    # every static input quantizer calibrated block by block: by the block's pass, or from
    # SmoothQuant's own statistics (amax_from_stats)
    assert all(r["calibrated"] + r.get("amax_from_stats", 0) > 0 for r in rows)
    assert fp_error(model, ids, ref) < 1e-5


def outlier_llama():
    """Tiny Llama whose norms create a few large activation channels (as real LLMs have)."""
    model = llama_mha()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] = 30.0
    return model


def test_smoothquant_beats_plain_w8a8_with_outliers():
    base = outlier_llama()
    ids = calib_ids(8, 32)
    with torch.no_grad():
        ref = base(ids).logits
    err = {}
    for name in ["int8", "int8-smoothquant"]:
        m = copy.deepcopy(base)
        lowbit.quantize(m, name, forward_loop=loop_over(ids))
        with torch.no_grad():
            err[name] = float((m(ids).logits - ref).norm() / ref.norm())
    assert err["int8-smoothquant"] < 0.7 * err["int8"], err


@pytest.mark.parametrize("search", [False, True])
def test_amax_from_stats_equals_a_calibration_pass(search):
    """The smoothed linears' static input amax taken from the folded statistics equals what
    the block's calibration pass observes (up to rounding), and that pass is skipped."""
    base = outlier_llama()
    ids = calib_ids(6, 16)
    amax, rows = {}, {}
    for from_stats in (True, False):
        m = copy.deepcopy(base)
        d = lowbit.recipes.load("int8-smoothquant").to_dict()
        d["algorithms"][0]["args"].update(amax_from_stats=from_stats, search=search, grid=4)
        lowbit.quantize(m, d, forward_loop=loop_over(ids))
        amax[from_stats] = {n: q.amax.clone() for n, q in m.named_modules()
                            if n.endswith("input_quantizer") and q.amax is not None}
        rows[from_stats] = m.lowbit_report.blocks
    assert amax[True].keys() == amax[False].keys() and len(amax[True]) == 14
    for n, a in amax[True].items():
        assert torch.allclose(a, amax[False][n], rtol=1e-5, atol=0), n
    # all 7 linears of each block smoothed (q/k/v, gate/up, v->o, up->down): no pass left
    assert [r["amax_from_stats"] for r in rows[True]] == [7, 7]
    assert [r["calibrated"] for r in rows[True]] == [0, 0]
    assert [r["calibrated"] for r in rows[False]] == [7, 7]


def test_alpha_search_is_never_worse_than_the_fixed_alpha():
    """Per group, the searched alpha scores at most the fixed alpha's loss (it is in the grid)."""
    from lowbit.algorithms import GroupProbe, smooth_group

    ctx, stats = _probe_setup(means=True, sample_tokens=None)
    for g in ctx.scale_groups():
        probe = GroupProbe(ctx.block, g, ctx.capture([g.parent], ctx.chunks), act_quant=True)
        alpha, s, losses = smooth_group(ctx.block, g, stats[g.linears[0]].absmax, 0.5, probe,
                                        [0.1, 0.3, 0.7, 0.9], fold=False)
        assert losses[alpha] <= losses[0.5] and set(losses) == {0.1, 0.3, 0.5, 0.7, 0.9}


def test_unknown_algorithm_and_argument_fail_before_running():
    calls = []

    def loop(model):
        calls.append(1)
        model(calib_ids()[:1])

    with pytest.raises(lowbit.errors.ConfigError, match="unknown algorithm 'gtpq'"):
        lowbit.quantize(build("llama"), {"targets": [{"pattern": "*", "weight": "int8"}],
                                         "algorithms": ["gtpq"]}, forward_loop=loop)
    with pytest.raises(lowbit.errors.ConfigError, match="unknown argument 'damp'"):
        lowbit.quantize(build("llama"), {"targets": [{"pattern": "*", "weight": "int8"}],
                                         "algorithms": [{"name": "gptq", "args": {"damp": 1}}]},
                        forward_loop=loop)
    # an argument of the wrong type (a YAML string "false" would be true for bool())
    for args, what in (({"refine": "false"}, "refine='false'; expected true or false"),
                       ({"grid": 10.5}, "grid=10.5; expected an integer"),
                       ({"alpha": "0.5"}, "alpha='0.5'; expected a number"),
                       ({"loss": 1}, "loss=1; expected a string")):
        with pytest.raises(lowbit.errors.ConfigError, match=what.replace("(", r"\(")):
            lowbit.quantize(build("llama"), {"targets": [{"pattern": "*", "weight": "int8",
                                                          "input": "int8"}],
                                             "algorithms": [{"name": "smoothquant",
                                                             "args": args}]},
                            forward_loop=loop)
    assert not calls


@pytest.mark.parametrize("n", [4, 10, 11, 20, 21])
def test_search_grid_refine_finds_the_minimum_of_one_basin(n):
    # refine: a coarse pass, then around its best: the same argmin with ~3 sqrt(n) calls
    from lowbit.algorithms.smoothing import search_grid

    pts = [i / n for i in range(n)]
    for centre in pts:
        calls = []

        def f(a):
            calls.append(a)
            return (a - centre) ** 2

        full = search_grid(pts, f)
        assert len(calls) == n and list(full) == pts
        calls.clear()
        got = search_grid(pts, f, refine=True)
        assert min(got, key=got.get) == centre
        assert len(calls) == len(set(calls)) <= 3 * round(n ** 0.5) + 1
        assert n < 10 or len(calls) < n
        assert all(got[a] == full[a] for a in got)


def _probe_setup(means=False, sample_tokens=48):
    """``(BlockContext of the first block of an int8 outlier Llama, its linear stats)``."""
    from lowbit.pipeline.blocks import BlockContext, capture_block_inputs

    model = outlier_llama()
    lowbit.quantize(model, "int8", forward_loop=loop_over(calib_ids(4, 16)))
    adapter = get_adapter(model)
    blocks = adapter.find_blocks(model)[1]
    cap = capture_block_inputs(model, blocks, loop_over(calib_ids(4, 16)))
    ctx = BlockContext(model, blocks[0], "model.layers.0", 0, adapter, cap.chunks, {})
    if sample_tokens is not None:
        ctx.sample_tokens = sample_tokens
    return ctx, ctx.linear_stats(means=means)


def test_direct_probe_equals_the_module_probe_and_max_rows_scores_a_row_subset():
    """``direct`` gives the module path's loss exactly; ``max_rows`` sums the kept rows'
    errors scaled by out / rows (computed here by hand from the direct path's outputs)."""
    from lowbit.algorithms import GroupProbe, smoothquant_scales
    from lowbit.algorithms.smoothquant import group_weight_max

    ctx, stats = _probe_setup()
    assert all(st.absmean is None and st.nabsmean is None for st in stats.values())
    for g in ctx.scale_groups():
        inputs = {n: [((stats[n].sample,), {})] for n in g.linears}
        s = smoothquant_scales(stats[g.linears[0]].absmax, group_weight_max(ctx.block, g), 0.6)
        module = GroupProbe(ctx.block, g, inputs, act_quant=True)
        direct = GroupProbe(ctx.block, g, inputs, act_quant=True, direct=True)
        assert direct.loss(s) == module.loss(s) and direct.loss(None) == module.loss(None)
        rows = GroupProbe(ctx.block, g, inputs, act_quant=True, max_rows=5)
        outs, refs = direct._row_outputs(s, None, quant=True), direct.ref
        want = 0.0
        for i, n in enumerate(g.linears):
            out = ctx.block.get_submodule(n).weight.shape[0]
            idx = torch.linspace(0, out - 1, 5).round().long()
            want += out / 5 * float((outs[i][:, idx] - refs[i][:, idx]).square().sum())
        assert rows.loss(s) == pytest.approx(want, rel=1e-5)  # (row-subset matmul order)
        assert rows.loss(s) != direct.loss(s)


def test_max_rows_needs_the_linears_loss():
    from lowbit.errors import ConfigError

    m = build("llama")
    r = lowbit.recipes.load("int8-smoothquant").to_dict()
    r["algorithms"][0]["args"].update(loss="module", max_rows=64)
    with pytest.raises(ConfigError, match="max_rows=64 .* needs loss='linears'"):
        lowbit.quantize(m, r, forward_loop=loop_over(calib_ids(2, 16)))
    for bad in (0, "64"):
        r["algorithms"][0]["args"].update(loss="linears", max_rows=bad)
        with pytest.raises(ConfigError, match="max_rows must be a positive number"):
            lowbit.quantize(build("llama"), r, forward_loop=loop_over(calib_ids(2, 16)))
    ctx, stats = _probe_setup()
    from lowbit.algorithms import GroupProbe

    g = ctx.scale_groups()[0]
    with pytest.raises(ConfigError, match="max_rows / direct"):
        GroupProbe(ctx.block, g, ctx.capture([g.parent], ctx.chunks), max_rows=4)
