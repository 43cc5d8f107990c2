"""Nothing silent: the quantized share of the weights, why the rest is not, routers kept in
float, and group sizes that do not fit (issue 16)."""

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ConfigError
from lowbit.nn.routers import find_routers
from tests.tiny_models import group_over

VOCAB = 128


def tiny_mixtral():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2)
    return tf.MixtralForCausalLM(cfg).eval()


def tiny_qwen2_moe():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=4, num_experts_per_tok=2)
    return tf.Qwen2MoeForCausalLM(cfg).eval()


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: LayerNorm, nn.MultiheadAttention, LayerNorm, MLP."""

    def __init__(self, d, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """torchvision-style ViT: Conv2d patch embedding, class token, position embedding,
    MHA + MLP blocks, and a head that is a Linear subclass."""

    def __init__(self, d=32, heads=4, mlp=128, layers=2, image=16, patch=4, classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.conv_proj = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d))
        self.encoder.layers = nn.Sequential(*[EncoderBlock(d, heads, mlp)
                                              for _ in range(layers)])
        self.encoder.ln = nn.LayerNorm(d)
        head = nn.modules.linear.NonDynamicallyQuantizableLinear(d, classes)
        self.heads = nn.Sequential(OrderedDict(head=head))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.encoder.ln(self.encoder.layers(x + self.encoder.pos_embedding))
        return self.heads(x[:, 0])


def quantize_warned(model, recipe, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lowbit.quantize(model, recipe, **kw)
    return [str(x.message) for x in w]


def expected_share(model, quantized_modules):
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    q = sum(model.get_submodule(n).weight.numel() for n in quantized_modules)
    return q / total


@pytest.mark.parametrize("build,kind", [
    (tiny_mixtral, "3-D expert parameters of MixtralExperts: not split into per-expert "
                   "linears (lowbit.quantize splits them: lowbit.adapters.experts)"),
    (tiny_qwen2_moe, "3-D expert parameters of Qwen2MoeExperts: not split into per-expert "
                     "linears (lowbit.quantize splits them: lowbit.adapters.experts)"),
])
def test_moe_experts_are_reported_and_warned(build, kind, capsys):
    """apply_recipe alone does not split the 3-D experts (lowbit.quantize does): reported."""
    from lowbit import recipes
    from lowbit.nn.swap import apply_recipe

    model = build()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model.lowbit_report = apply_recipe(model, recipes.load("int4-weight-only",
                                                               group_size=32))
    msgs = [str(x.message) for x in w]
    cov = model.lowbit_report.coverage
    assert cov.share == pytest.approx(expected_share(model, model.lowbit_report.quantized))
    assert cov.share < 0.5 and cov.targets_all
    experts = [u for u in cov.unquantized if u.reason == kind]
    assert len(experts) == 4  # gate_up_proj and down_proj of 2 layers
    assert all(u.name.endswith(("experts.gate_up_proj", "experts.down_proj")) for u in experts)
    assert {u.name for u in cov.listed()} >= {u.name for u in experts}
    warned = [m for m in msgs if "targets every linear" in m]
    assert len(warned) == 1 and kind in warned[0] and f"{cov.unsupported_share:.1%}" in warned[0]
    lowbit.print_summary(model)
    out = capsys.readouterr().out
    assert f"quantized {cov.share:.1%} of the weights" in out
    assert "MixtralExperts" in out or "Qwen2MoeExperts" in out
    # embeddings and LM head are counted apart
    assert cov.embeddings == VOCAB * 64 and cov.lm_head == VOCAB * 64
    assert cov.body == cov.total - 2 * VOCAB * 64


def test_vit_mha_and_linear_subclass_are_quantized():
    """nn.MultiheadAttention (packed in_proj_weight, lowbit.nn.mha) and Linear subclasses
    that keep Linear's forward (NonDynamicallyQuantizableLinear) are quantized."""
    model = TinyViT()
    msgs = quantize_warned(model, "int8-weight-only")
    cov = model.lowbit_report.coverage
    reasons = {u.name: u.reason for u in cov.unquantized}
    assert set(reasons) == {"class_token", "encoder.pos_embedding"}
    assert all(r.startswith("embedding") for r in reasons.values())
    # conv_proj, 2 x (attention, out_proj, 2 MLP linears), head
    assert len(model.lowbit_report.quantized) == 10
    assert cov.body_share == 1.0 and cov.unsupported_share == 0
    assert not any("targets every linear" in m for m in msgs)
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: lowbit cannot quantize it."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_strict_raises_and_leaves_the_model_untouched():
    model = nn.Sequential(ScaledLinear(64, 64), nn.Linear(64, 8))
    with pytest.raises(ConfigError, match=r"targets every linear but left \d+\.\d% .*"
                                          "Linear subclass ScaledLinear overrides forward"):
        lowbit.quantize(model, "int8-weight-only", strict=True)
    assert not any(isinstance(m, lowbit.nn.QuantMixin) for m in model.modules())


def test_full_coverage_is_quiet():
    from tests.tiny_models import build

    model = build("llama")
    msgs = quantize_warned(model, "int8-weight-only")
    cov = model.lowbit_report.coverage
    assert cov.body_share == 1.0 and cov.unsupported_share == 0
    assert {u.kind for u in cov.unquantized} == {"embedding", "lm_head"}
    assert not [m for m in msgs if "targets every linear" in m]


def test_partial_recipe_is_listed_not_warned():
    model = TinyViT()
    rec = {"name": "mlp-only", "targets": [{"pattern": "*.mlp.*", "weight": "int8"}]}
    msgs = quantize_warned(model, rec)
    cov = model.lowbit_report.coverage
    assert not cov.targets_all and not [m for m in msgs if "targets every linear" in m]
    assert any(u.reason == "not targeted by any recipe pattern" for u in cov.unquantized)


@pytest.mark.parametrize("recipe", ["int4-weight-only", "int8"])
def test_qwen2_moe_routers_stay_float(recipe):
    model = tiny_qwen2_moe()
    assert set(find_routers(model)) == {f"model.layers.{i}.mlp.{n}" for i in (0, 1)
                                        for n in ("gate", "shared_expert_gate")}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    quantize_warned(model, recipe, **group_over(recipe, 32),
                    forward_loop=lambda m: [m(r.unsqueeze(0)) for r in ids])
    for i in (0, 1):
        mlp = model.model.layers[i].mlp
        assert type(mlp.shared_expert_gate) is nn.Linear
        assert not isinstance(mlp.gate, lowbit.nn.QuantMixin)
        assert isinstance(mlp.shared_expert.gate_proj, lowbit.nn.QuantMixin)
    report = model.lowbit_report
    assert set(report.routers) == {f"model.layers.{i}.mlp.shared_expert_gate" for i in (0, 1)}
    routers = [u for u in report.coverage.unquantized if u.kind == "router"]
    assert len(routers) == 4 and all(u.reason == "router (excluded by default)"
                                     for u in routers)
    model(ids[:1])


def test_a_router_named_by_the_recipe_is_quantized():
    model = tiny_qwen2_moe()
    rec = {"name": "r", "targets": [
        {"pattern": "*", "weight": {"format": "int8", "granularity": "channel"}},
        {"pattern": "*shared_expert_gate", "weight": {"format": "int8",
                                                      "granularity": "channel"}}]}
    quantize_warned(model, rec)
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, lowbit.nn.QuantMixin)
    assert not isinstance(model.model.layers[0].mlp.gate, lowbit.nn.QuantMixin)


class LinearGateMoE(nn.Module):
    """An MoE block as older transformers wrote it: a Linear router and a ModuleList of
    experts (each a Linear MLP)."""

    def __init__(self, h=32, e=4):
        super().__init__()
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(h, 64), nn.Linear(64, h))
                                     for _ in range(e))

    def forward(self, x):
        w = self.gate(x).softmax(-1)
        return sum(w[..., i:i + 1] * ex(x) for i, ex in enumerate(self.experts))


def test_linear_router_found_by_shape():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(proj=nn.Linear(32, 32), moe=LinearGateMoE()))
    assert find_routers(model) == {"moe.gate": "one logit per expert (E=4)"}
    quantize_warned(model, "int8-weight-only")
    assert type(model.moe.gate) is nn.Linear
    assert isinstance(model.moe.experts[0][0], lowbit.nn.QuantMixin)
    assert model.lowbit_report.routers == ["moe.gate"]


def wide_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=192,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(cfg).eval()


def test_explicit_indivisible_group_size_is_an_error():
    model = wide_llama()
    with pytest.raises(ConfigError, match=r"layer model\.layers\.0\.self_attn\.q_proj: input "
                       r"width 96 is not a multiple of group size 64; group sizes <= 256 that "
                       r"divide it: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96; 5 more layer"):
        lowbit.quantize(model, "int4-weight-only", group_size=64)
    assert not any(isinstance(m, lowbit.nn.QuantMixin) for m in model.modules())
    # the user may ask for the fallback explicitly
    msgs = quantize_warned(model, "int4-weight-only", group_size=64, group_policy="fallback")
    assert len(model.lowbit_report.fallbacks) == 6 and len(msgs) == 1


def test_recipe_default_group_falls_back_with_every_layer_listed_in_one_warning():
    model = wide_llama()
    msgs = quantize_warned(model, "int4-weight-only")
    notes = model.lowbit_report.fallbacks
    names = [n.split(":")[0] for n in notes]
    assert names == model.lowbit_report.quantized  # every quantized layer, in model order
    assert notes[0] == "model.layers.0.self_attn.q_proj: group 128 -> 96 (96 % 128 != 0)"
    assert "model.layers.0.mlp.down_proj: group 128 -> 96 (192 % 128 != 0)" in notes
    fb = [m for m in msgs if "group size fallback" in m]
    assert len(fb) == 1
    assert "in 7 layer(s)" in fb[0] and "; and 4 more" in fb[0] and notes[2] in fb[0]
    assert model.model.layers[0].mlp.down_proj.weight_quantizer.spec.group_size == 96
    assert model.model.layers[0].mlp.down_proj.weight_quantizer.note == notes[-1]
    assert any("group size fallback" in line for line in model.lowbit_report.lines())
