"""The block runner: captured inputs reproduce the model, one block's activations at a time,
GPTQ through the pipeline, every algorithm preset end to end."""

import copy
import weakref

import pytest
import torch
from torch import nn

import lowbit
from lowbit import recipes
from lowbit.adapters import find_blocks, get_adapter
from lowbit.pipeline import blocks as B
from lowbit.pipeline import runner as R
from lowbit.pipeline.algorithms import algorithm_names, register_algorithm
from tests.tiny_models import build, calib_ids, loop_over, group_over


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared CPU: threads only add contention
    yield
    torch.set_num_threads(n)


def rel_err(model, ids, ref):
    with torch.no_grad():
        return float((model(ids).logits - ref).norm() / ref.norm())


def gemma3_mixed():
    """Tiny Gemma 3 with a sliding-window layer (window 8) and a global one."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])
    return tf.Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3", "qwen3"])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_captured_inputs_reproduce_the_model(family, chunk_size):
    """Block by block on the captured inputs gives the model's own hidden states (Gemma 3
    alternates sliding-window and global layers: per-block arguments are reproduced)."""
    model = gemma3_mixed() if family == "gemma3" else build(family)
    ids = calib_ids(5, 16)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    prefix, blocks = find_blocks(model)
    cap = B.capture_block_inputs(model, blocks, loop_over(ids), chunk_size=chunk_size)
    assert sum(c.n_samples for c in cap.chunks) == 5
    assert len(cap.chunks) == (5 if chunk_size == 1 else 2)
    if family == "gemma3":
        assert cap.overrides[1]  # layer 1 is a sliding-window layer in the tiny config
    ctx = None
    chunks = cap.chunks
    for i, block in enumerate(blocks):
        ctx = B.BlockContext(model, block, f"{prefix}.{i}", i, get_adapter(model), chunks,
                             cap.overrides[i])
        got = torch.cat([c.hidden for c in chunks])
        assert torch.allclose(got, hs[i], atol=1e-5, rtol=1e-5), i
        R._replace_with_outputs(ctx, fp=True)
    if family in ("llama", "qwen3", "gemma3"):  # the last hidden state is after the norm
        norm = model.model.norm
        with torch.no_grad():
            assert torch.allclose(norm(torch.cat([c.hidden for c in chunks])), hs[-1],
                                  atol=1e-5, rtol=1e-4)


def test_capture_stops_early():
    """Only the embeddings run for the inputs, and the first batch stops before the head."""
    model = build("llama")
    ids = calib_ids(3, 16)
    calls = {"head": 0, "last": 0}
    h1 = model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", 1))
    h2 = model.model.layers[-1].register_forward_hook(
        lambda *a: calls.__setitem__("last", calls["last"] + 1))
    _, blocks = find_blocks(model)
    cap = B.capture_block_inputs(model, blocks, loop_over(ids))
    h1.remove()
    h2.remove()
    assert calls == {"head": 0, "last": 0}
    assert len(cap.chunks) == 1 and cap.chunks[0].hidden.shape == (3, 16, 64)


@pytest.mark.parametrize("feed", ["quantized", "fp"])
def test_holds_one_block_of_activations(feed):
    """Every hidden-state tensor a block returns is tracked (weak references): whenever a
    block runs, the live ones are at most one block's worth plus one chunk (feed="fp": the
    statistics pass keeps the float outputs of the whole block, one block more), and none
    is older than the previous block."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).eval()
    n_samples, seq, chunk = 8, 16, 2
    one_block = n_samples * seq * 64 * 4
    one_chunk = chunk * seq * 64 * 4
    live: list[tuple[int, weakref.ref, int]] = []
    peak = {"bytes": 0, "blocks_run": set()}

    def post(i):
        def hook(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            live.append((i, weakref.ref(t), t.numel() * t.element_size()))
        return hook

    def pre(i):
        def hook(mod, args, kwargs):
            # tensors are freed by reference counting: no gc.collect() needed
            alive = [(j, n) for j, r, n in live if r() is not None]
            peak["bytes"] = max(peak["bytes"], sum(n for _, n in alive))
            assert all(j >= i - 1 for j, _ in alive), (i, sorted({j for j, _ in alive}))
            peak["blocks_run"].add(i)
        return hook

    hs = []
    for i, b in enumerate(model.model.layers):
        hs.append(b.register_forward_hook(post(i)))
        hs.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
    lowbit.quantize(model, "int8-smoothquant", forward_loop=loop_over(calib_ids(n_samples, seq)),
                    chunk_size=chunk, feed=feed)
    for h in hs:
        h.remove()
    assert peak["blocks_run"] == {0, 1, 2, 3}
    extra = one_block if feed == "fp" else 0
    assert 0 < peak["bytes"] <= one_block + one_chunk + extra, (peak["bytes"], one_block)


def test_gptq_through_the_pipeline_beats_rtn():
    base = build("llama")
    ids = calib_ids(8, 32)
    with torch.no_grad():
        ref = base(ids).logits
    err = {}
    variants = {"rtn": ("int4-weight-only", {}),
                "gptq": ("int4-gptq", {}),
                "gptq-actorder": ("int4-gptq-actorder", {}),
                "gptq-not-sequential": ("int4-gptq", {"true_sequential": False}),
                "gptq-f64": ("int4-gptq", {"dtype": "float64", "block_size": 16}),
                "gptq-token-norm": ("int4-gptq", {"token_weight": "norm"})}
    for name, (preset, args) in variants.items():
        m = copy.deepcopy(base)
        r = recipes.load(preset, group_size=32)
        if args:
            d = r.to_dict()
            d["algorithms"][0].setdefault("args", {}).update(args)
            r = recipes.load(d)
        lowbit.quantize(m, r, forward_loop=loop_over(ids))
        err[name] = rel_err(m, ids, ref)
        if name != "rtn":  # the module's own fake quant reproduces GPTQ's weights
            for mod in m.modules():
                if hasattr(mod, "weight_quantizer") and mod.weight_quantizer.is_enabled:
                    assert mod.weight_quantizer.scale is not None
                    assert torch.equal(mod.quantized_weight(), mod.weight)
    for name in variants:
        if name != "rtn":
            assert err[name] < 0.8 * err["rtn"], err


@pytest.mark.parametrize("preset", ["int4-awq", "int4-gptq", "int4-gptq-actorder",
                                    "int8-smoothquant", "nvfp4-awq", "w4a8-awq"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_algorithm_presets_end_to_end(preset, family):
    model = build(family)
    ids = calib_ids(4, 16)
    rows = []
    lowbit.quantize(model, preset, forward_loop=loop_over(ids), **group_over(preset, 32),
                    progress=lambda i, n, name: rows.append((i, n, name)))
    assert [r[0] for r in rows] == [1, 2]
    with torch.no_grad():
        assert torch.isfinite(model(ids[:1]).logits).all()
    assert len(model.lowbit_report.blocks) == 2


def test_presets_load_with_group_override():
    for name in ["int4-awq", "int4-gptq", "int4-gptq-actorder", "int8-smoothquant",
                 "nvfp4-awq", "w4a8-awq"]:
        r = recipes.load(name, **group_over(name, 64))
        assert r.algorithms, name
        w = r.targets[0].weight
        if w.format == "int4":
            assert w.group_size == 64
    assert recipes.load("int4-gptq-actorder").algorithms[0].args["act_order"] is True
    assert recipes.load("int8-smoothquant").algorithms[0].args["alpha"] == 0.5


def test_feed_fp_and_quantized():
    """With feed='fp' block 1 sees the FP model's hidden states; with 'quantized' it does not."""
    base = build("llama")
    ids = calib_ids(4, 16)
    with torch.no_grad():
        hs = base(ids, output_hidden_states=True).hidden_states
    seen = {}
    for feed in ["fp", "quantized"]:
        m = copy.deepcopy(base)
        got = []
        h = m.model.layers[1].register_forward_pre_hook(
            lambda mod, a, k: got.append((a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True)
        lowbit.quantize(m, "int4-gptq", forward_loop=loop_over(ids), group_size=32, feed=feed,
                        chunk_size=4)
        h.remove()
        seen[feed] = got[-1]  # block 1's inputs as the runner computed them
    assert torch.allclose(seen["fp"], hs[1], atol=1e-5)
    assert not torch.allclose(seen["quantized"], hs[1], atol=1e-3)
    with pytest.raises(lowbit.errors.ConfigError, match="feed"):
        lowbit.quantize(copy.deepcopy(base), "int4-gptq", forward_loop=loop_over(ids),
                        group_size=32, feed="float")


class LNMLP(nn.Module):
    """No decoder blocks: LayerNorm -> two linears reading one input -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(32, 64)
        self.out = nn.Linear(64, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 2.0)
            self.norm.weight[[1, 7]] = 20.0

    def forward(self, x):
        h = self.norm(x)
        return self.out(torch.relu(self.a(h)) * self.b(h))


def test_model_without_blocks_is_one_block():
    x = torch.randn(16, 10, 32, generator=torch.Generator().manual_seed(0))
    loop = lambda m: [m(row) for row in x]  # noqa: E731
    base = LNMLP().eval()
    with torch.no_grad():
        ref = base(x)
    assert get_adapter(base) is None
    errs = {}
    for name in ["int8", "int8-smoothquant", "int4-gptq", "int4-awq", "int4-weight-only"]:
        m = copy.deepcopy(base)
        lowbit.quantize(m, name, forward_loop=loop, **group_over(name, 16))
        with torch.no_grad():
            errs[name] = float((m(x) - ref).norm() / ref.norm())
        if name != "int8" and name != "int4-weight-only":
            assert [r["block"] for r in m.lowbit_report.blocks] == ["(model)"]
    assert errs["int8-smoothquant"] < errs["int8"]
    assert errs["int4-gptq"] < errs["int4-weight-only"]


def test_registered_block_step_and_blockwise_calibration():
    seen = []

    def probe(ctx, args):
        stats = ctx.linear_stats()
        seen.append((ctx.name, args["k"], sorted(stats)[:1], stats["mlp.down_proj"].n_tokens))

    register_algorithm("probe-test", probe, args={"k": 1})
    assert "probe-test" in algorithm_names() and "gptq" in algorithm_names()
    model = build("llama")
    ids = calib_ids(3, 16)
    lowbit.quantize(model, {"targets": [{"pattern": "*", "weight": "int8"}],
                            "algorithms": [{"name": "probe-test", "args": {"k": 2}}]},
                    forward_loop=loop_over(ids))
    assert seen == [("model.layers.0", 2, ["mlp.down_proj"], 48),
                    ("model.layers.1", 2, ["mlp.down_proj"], 48)]
    # no algorithm: blockwise=True calibrates block by block (quantized inputs)
    m = build("llama")
    lowbit.quantize(m, "int8", forward_loop=loop_over(ids), blockwise=True)
    assert [r["calibrated"] for r in m.lowbit_report.blocks] == [7, 7]
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()


@pytest.mark.parametrize("recipe", ["int8-smoothquant", "int4-awq"])
def test_feed_fp_outputs_kept_by_the_statistics_pass(monkeypatch, recipe):
    """feed='fp' with a statistics pass before any weight change: its float outputs feed the
    next block (no extra pass), and the model is the one the extra pass gives, bit for bit."""
    from lowbit.pipeline import blocks

    base = build("llama")
    ids = calib_ids(4, 16)
    got = {}
    for keep in [True, False]:
        m = copy.deepcopy(base)
        if not keep:
            monkeypatch.setattr(blocks, "_param_sig", lambda b, n=iter(range(10**6)): next(n))
        over = {"group_size": 32} if "int4" in recipe else {}
        lowbit.quantize(m, recipe, forward_loop=loop_over(ids), feed="fp", chunk_size=2,
                        **over)
        monkeypatch.undo()
        rows = m.lowbit_report.blocks
        assert [bool(r.get("fp_outputs_from_stats")) for r in rows] == \
            [keep] * (len(rows) - 1) + [False], rows
        with torch.no_grad():
            got[keep] = m(ids).logits
    assert torch.equal(got[True], got[False])


def test_recipe_feed_and_the_argument_that_overrides_it():
    """A recipe's ``feed`` applies when quantize() is not given one; the argument wins."""
    base = build("llama")
    ids = calib_ids(4, 16)
    d = recipes.load("int8-smoothquant").to_dict()
    for recipe_feed, arg, want in [("fp", None, True), ("fp", "quantized", False),
                                   (None, None, False), ("quantized", "fp", True)]:
        d["feed"] = recipe_feed
        m = copy.deepcopy(base)
        lowbit.quantize(m, recipes.load(d), forward_loop=loop_over(ids), feed=arg, chunk_size=2)
        assert bool(m.lowbit_report.blocks[0].get("fp_outputs_from_stats")) == want, \
            (recipe_feed, arg)
    d["feed"] = "fp"  # kept through to_dict and load-time overrides
    assert recipes.load(recipes.load(d).to_dict()).feed == "fp"
    assert recipes.load("int8-smoothquant", kv_cache="int8").feed == "fp"
    d["feed"] = "float"
    with pytest.raises(lowbit.errors.ConfigError):
        recipes.load(d)


def test_report_says_how_the_blocks_were_fed_and_the_memo_peak():
    """The report names the block runner's feed (None when no block ran) and the most memory
    the reused outputs held in one block, also in its console lines."""
    import lowbit as lb
    from tests.tiny_models import build as build_model, calib_ids as ids_, loop_over as loop_

    rows = {}
    for rec, kw in (("int4-gptq", {"group_size": 32}), ("int8-smoothquant", {}),
                    ("int4-weight-only", {"group_size": 32})):
        m = build_model("llama")
        rows[rec] = lb.quantize(m, rec, forward_loop=loop_(ids_(4, 16)), **kw).lowbit_report
    g, sq, rtn = rows["int4-gptq"], rows["int8-smoothquant"], rows["int4-weight-only"]
    assert (g.feed, sq.feed, rtn.feed) == ("quantized", "fp", None)
    assert all(r["memo_peak_mb"] > 0 for r in g.blocks)
    line = next(x for x in g.lines() if x.startswith("blocks:"))
    assert "feed quantized" in line and "MiB per block" in line
    assert any("feed fp" in x for x in sq.lines())
    assert not any(x.startswith("blocks:") for x in rtn.lines())
