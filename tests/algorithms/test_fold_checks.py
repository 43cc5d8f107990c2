"""Folds keep the float function or are refused: norm kinds by behaviour, checked folds.

Issue 16: SmoothQuant folded into RMSNorms that scale by ``1 + w`` as if they scaled by
``w`` unless the class name said "Gemma" (a tiny Qwen3-Next lost its function, relative
error ~1, without a word). Now the norm is run to tell, every fold is checked on the
block's captured inputs, and a fold that changes the function is undone and refused.
"""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import recipes
from lowbit.adapters import InputGroup, find_blocks, norm_kind
from lowbit.algorithms import smoothing
from lowbit.algorithms.foldcheck import FoldCheck, fold_tolerance
from lowbit.algorithms.smoothing import fold_scales
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn import disable_quantizers
from tests.tiny_models import VOCAB, build, calib_ids, loop_over


def _random_norms(model):
    """Norm weights away from their init (zeros for ``1 + w`` norms, ones for ``w``), so
    that folding into them as the wrong kind cannot go unnoticed."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1:
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.3)
    return model


def qwen3_next():
    """Tiny Qwen3-Next: a gated-delta-net (linear attention) layer and a full-attention
    layer, dense MLPs; its RMSNorm scales by ``1 + w`` and is not named Gemma."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen3NextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, layer_types=["linear_attention", "full_attention"],
                             num_experts=0, linear_num_value_heads=4, linear_num_key_heads=2,
                             linear_key_head_dim=16, linear_value_head_dim=16)
    return _random_norms(tf.Qwen3NextForCausalLM(cfg).eval())


def gemma3():
    """Tiny Gemma 3 (``1 + w`` norms) with a sliding-window layer and a global one."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, sliding_window=8, layer_types=["sliding_attention",
                                                                          "full_attention"])
    return _random_norms(tf.Gemma3ForCausalLM(cfg).eval())


def olmo2():
    """Tiny OLMo 2: its norms follow attention and MLP (post-norm)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Olmo2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return _random_norms(tf.Olmo2ForCausalLM(cfg).eval())


def gemma():
    """Tiny Gemma (1): Llama's layout, ``1 + w`` norms."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
    return _random_norms(tf.GemmaForCausalLM(cfg).eval())


MODELS = {"qwen3_next": qwen3_next, "gemma3": gemma3, "olmo2": olmo2, "gemma": gemma}


def recipe(name):
    """The preset, with group 32 (the tiny widths are 64) and, for Qwen3-Next, its gated
    delta net's ``conv1d`` excluded: the layer reads ``conv1d.weight`` directly and never
    calls the module, so a quantizer on it would never see data."""
    d = recipes.load(name).to_dict()
    d["exclude"] = [*d["exclude"], "*conv1d"]
    for t in d["targets"]:
        if t["weight"].get("granularity") == "group":
            t["weight"]["group_size"] = 32
    return d


def float_logits(model, ids):
    disable_quantizers(model)
    for m in model.modules():
        if hasattr(m, "invalidate_weight_cache"):
            m.invalidate_weight_cache()
    with torch.no_grad():
        return model(ids).logits


def rel(a, b):
    return float((a - b).norm() / b.norm())


# --- the norm's kind, by behaviour ---------------------------------------------------------------
def test_norm_kind_by_behaviour():
    import transformers.models.gemma3.modeling_gemma3 as gm
    import transformers.models.llama.modeling_llama as lm
    import transformers.models.qwen3_next.modeling_qwen3_next as qm

    assert norm_kind(lm.LlamaRMSNorm(16)) == "w"
    assert norm_kind(gm.Gemma3RMSNorm(16)) == "1+w"
    assert norm_kind(qm.Qwen3NextRMSNorm(16)) == "1+w"  # not named Gemma
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    saved = (ln.weight.clone(), ln.bias.clone())
    assert norm_kind(ln) == "w"
    assert torch.equal(ln.weight, saved[0]) and torch.equal(ln.bias, saved[1])  # restored
    # a gated norm needs its real inputs: y = w * n(x) * silu(gate)
    gated = qm.Qwen3NextRMSNormGated(16)
    with pytest.raises(ConfigError, match=r"Qwen3NextRMSNormGated.*could not be run"):
        norm_kind(gated, name="linear_attn.norm")
    assert norm_kind(gated, ((torch.randn(3, 16), torch.randn(3, 16)), {})) == "w"
    # a callable's real inputs are taken only when the probe input is not enough
    assert norm_kind(gated, lambda: ((torch.randn(3, 16), torch.randn(3, 16)), {})) == "w"

    def never():
        raise AssertionError("captured inputs asked for a norm that runs on x alone")

    assert norm_kind(qm.Qwen3NextRMSNorm(16), never) == "1+w"
    assert norm_kind(lm.LlamaRMSNorm(16).to(torch.bfloat16)) == "w"
    assert norm_kind(gm.Gemma3RMSNorm(16).to(torch.float16)) == "1+w"


class HalfOffsetNorm(nn.Module):
    """An RMSNorm that scales by ``0.5 + w``."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (0.5 + self.weight)


class SquareNorm(HalfOffsetNorm):
    """Scales by ``w ** 2``: not linear in its weight."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight ** 2


class OnePlusNorm(HalfOffsetNorm):
    """Scales by ``1 + w`` (a Llama norm swapped for it contradicts the adapter)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


def test_unexpected_norms_are_refused_naming_the_module_and_class():
    with pytest.raises(ConfigError, match=r"norm ln \(HalfOffsetNorm\) scales .* by w \+ 0\.5"):
        norm_kind(HalfOffsetNorm(16), name="ln")
    with pytest.raises(ConfigError, match=r"SquareNorm.*not n\(x\) \* \(offset \+ w\)"):
        norm_kind(SquareNorm(16))
    with pytest.raises(ConfigError, match=r"LayerNorm.*no per-channel weight"):
        norm_kind(nn.LayerNorm(16, elementwise_affine=False))


@pytest.mark.parametrize("cls,match", [(HalfOffsetNorm, r"HalfOffsetNorm\) scales"),
                                       (OnePlusNorm, r"OnePlusNorm\) scales by 1\+w, but the "
                                                     r"family's adapter declares w")])
def test_a_model_with_an_unexpected_norm_is_refused_and_left_alone(cls, match):
    """In the pipeline: refused before anything changes (the adapter declares Llama's norms
    ``w``: a module that behaves otherwise is an error too)."""
    model = build("llama")
    for layer in model.model.layers:
        new = cls(64)
        with torch.no_grad():
            new.weight.copy_(layer.input_layernorm.weight)
        layer.input_layernorm = new
    ids = calib_ids(4, 16)
    with torch.no_grad():
        ref = model(ids).logits
    with pytest.raises(ConfigError, match=r"norm input_layernorm \(" + match):
        lowbit.quantize(model, recipe("int8-smoothquant"), forward_loop=loop_over(ids))
    assert rel(float_logits(model, ids), ref) == 0.0


# --- every fold keeps the function, or is refused --------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_next", "gemma3", "olmo2", "gemma"])
@pytest.mark.parametrize("preset,args", [("int8-smoothquant", {}), ("int4-awq", {}),
                                         ("int4-awq", {"guard": False})],
                         ids=["smoothquant", "awq", "awq-no-guard"])
def test_folds_keep_the_float_function(family, preset, args):
    """SmoothQuant and AWQ, quantizers disabled afterwards: the float model's logits
    (Qwen3-Next: relative error 1.07 before the norm was probed; OLMo 2: its post-norms
    were taken for pre-norms; AWQ's guard hid some of it by reverting whole blocks)."""
    model = MODELS[family]()
    ids = calib_ids(6, 16)
    with torch.no_grad():
        ref = model(ids).logits
    d = recipe(preset)
    d["algorithms"][0].setdefault("args", {}).update(args)
    lowbit.quantize(model, d, forward_loop=loop_over(ids))
    rows = model.lowbit_report.blocks
    key = "smoothquant_alpha" if preset == "int8-smoothquant" else "awq_alpha"
    assert len(rows) == 2 and all(r[key] for r in rows)  # something was folded
    assert all(0 <= r["fold_error"] < 1e-5 for r in rows if any(r[key]))
    assert rel(float_logits(model, ids), ref) < 1e-5


@pytest.mark.parametrize("preset,what", [("int8-smoothquant", "smoothquant"),
                                         ("int4-awq", "awq")])
def test_a_broken_fold_is_refused_and_the_model_restored(monkeypatch, preset, what):
    """The old guess (``w`` for any norm not named Gemma) on Qwen3-Next: the check refuses
    the fold with the block, the group and the error, and puts the weights back (AWQ's
    guard no longer gets the chance to revert the block quietly)."""
    model = qwen3_next()
    ids = calib_ids(6, 16)
    with torch.no_grad():
        ref = model(ids).logits
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(smoothing, "norm_kind", lambda norm, inputs=None, name=None: "w")
    with pytest.raises(CalibrationError, match=rf"block model\.layers\.0: folding {what} "
                       r"scales into \w+layernorm -> [\w.]+(, [\w.]+)* changed the block's "
                       r"float function \(relative error [0-9.e+-]+ > 0\.0001"):
        lowbit.quantize(model, recipe(preset), forward_loop=loop_over(ids))
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    assert rel(float_logits(model, ids), ref) == 0.0


def test_fold_check_restores_weights_and_fixed_scales():
    """A fold into a norm that also feeds the residual stream (OLMo 2's
    ``post_attention_layernorm`` taken for the MLP's pre-norm) is refused; the norm, the
    linears and their fixed weight scales are as before."""
    model = olmo2()
    lowbit.quantize(model, {"targets": [{"pattern": "*mlp*", "weight": "int8"}]})
    block = find_blocks(model)[1][0]
    up = block.mlp.up_proj
    up.weight_quantizer.set_fixed_scale(torch.full((128, 1), 0.01))
    fixed = up.weight_quantizer.scale
    h = torch.randn(1, 8, 64)
    pos = model.model.rotary_emb(h, torch.arange(8)[None])
    check = FoldCheck(block, [((h,), {"position_embeddings": pos})], "model.layers.0")
    group = InputGroup(linears=["mlp.gate_proj", "mlp.up_proj"],
                       prev="post_attention_layernorm")
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    with pytest.raises(CalibrationError, match=r"model\.layers\.0: folding per-channel "
                       r"scales into post_attention_layernorm -> mlp\.gate_proj, "
                       r"mlp\.up_proj changed"):
        check.fold(group, torch.rand(64) + 0.5)
    for n, p in block.named_parameters():
        assert torch.equal(p, before[n]), n
    assert up.weight_quantizer.scale is fixed  # the fold dropped it: put back
    # a change that fails half-way is undone too

    def half_way():
        with torch.no_grad():
            up.weight.mul_(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        check.guard(half_way, ["mlp.up_proj"], "a rotation")
    assert torch.equal(up.weight, before["mlp.up_proj.weight"])
    # a fold that keeps the function passes and reports its (rounding-level) error
    pair = InputGroup(linears=["mlp.down_proj"], prev="mlp.up_proj", prev_kind="linear")
    assert check.fold(pair, torch.rand(128) + 0.5) < 1e-5
    # checked together: one pass; a failure replays them to name the first bad one and
    # undoes them all
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    assert check.fold(pair, torch.rand(128) + 0.5, check=False) is None
    check.fold(group, torch.rand(64) + 0.5, what="awq", check=False)
    assert check.pending == 2
    with pytest.raises(CalibrationError, match=r"folding awq scales into "
                       r"post_attention_layernorm -> mlp\.gate_proj, mlp\.up_proj changed"):
        check.verify()
    assert check.pending == 0
    for n, p in block.named_parameters():
        assert torch.equal(p, before[n]), n


def test_fold_scales_checks_the_declared_kind_before_changing_anything():
    model = build("llama")
    block = find_blocks(model)[1][0]
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    group = InputGroup(linears=["mlp.gate_proj", "mlp.up_proj"],
                       prev="post_attention_layernorm", norm="1+w")
    with pytest.raises(ConfigError, match=r"LlamaRMSNorm\) scales by w, but the family's "
                       r"adapter declares 1\+w"):
        fold_scales(block, group, torch.rand(64) + 0.5)
    for n, p in block.named_parameters():
        assert torch.equal(p, before[n]), n


def test_fold_tolerance_by_dtype_and_bfloat16_folds_pass():
    assert fold_tolerance(torch.float32) == 1e-4
    assert fold_tolerance(torch.float16) == 5e-3 and fold_tolerance(torch.bfloat16) == 5e-2
    for dtype in (torch.bfloat16, torch.float16):
        model = gemma3().to(dtype)
        lowbit.quantize(model, recipe("int8-smoothquant"), forward_loop=loop_over(calib_ids()))
        rows = model.lowbit_report.blocks
        assert all(r["smoothquant_alpha"] and r["fold_error"] < fold_tolerance(dtype) / 3
                   for r in rows), rows


def test_fold_tol_argument():
    d = recipe("int8-smoothquant")
    d["algorithms"][0]["args"]["fold_tol"] = 2
    with pytest.raises(ConfigError, match=r"smoothquant: fold_tol must be a relative error"):
        lowbit.quantize(build("llama"), d, forward_loop=loop_over(calib_ids(2, 8)))


def test_awq_guard_revert_is_loud(monkeypatch):
    """When AWQ makes a block's quantized error worse, the block is put back: with a
    warning and a note in the block's row, not silently."""
    from lowbit.algorithms import steps

    errors = iter([1.0, 2.0] * 2)  # before, after for each of the two blocks
    monkeypatch.setattr(steps, "_block_error", lambda ctx, sample, ref: next(errors))
    model = build("llama")
    base = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"awq: block model\.layers\.0: AWQ made the block's "
                      r"quantized output error worse \(1 -> 2"):
        lowbit.quantize(model, recipe("int4-awq"), forward_loop=loop_over(calib_ids(4, 16)))
    rows = model.lowbit_report.blocks
    assert all(r["awq_reverted"] and "put back" in r["notes"][0] for r in rows)
    for (n, p), q in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), n
