"""runtime.convert on MoE models: one packed layer per expert projection, only routed
experts computed, the fake-quantized model reproduced, float layers named."""

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.nn.experts import MoEExperts
from lowbit.nn.modules import QuantLinear
from lowbit.nn.routers import find_routers
from lowbit.runtime import PackedLinear
from tests.moe_models import MOE_FAMILIES, VOCAB, build_moe

pytest.importorskip("transformers")

IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("recipe,kernel", [("int4-weight-only", "int4_weight_only"),
                                           ("int8-weight-only", "int8_weight_only")])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_convert_matches_fake_quant(family, recipe, kernel):
    m = build_moe(family)
    lowbit.quantize(m, recipe)
    experts = {n: x for n, x in m.named_modules() if isinstance(x, MoEExperts)}
    with torch.no_grad():
        a = m(IDS).logits
        report = rt.convert(m, act_dtype=torch.float32)  # float32: the dense tolerance 1e-5
        b = m(IDS).logits
    assert rel_err(a, b) <= 1e-5
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    for n, ex in experts.items():
        for e in ex:
            for role in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(e, role)
                assert isinstance(lin, PackedLinear), (n, role)
                assert lin.kernel in (kernel, "reference")
    assert report[kernel] >= 3 * sum(len(x) for x in experts.values())
    routers = find_routers(m)
    assert routers and set(routers) <= set(report.float)
    assert not report.fused_experts and "lm_head" in report.float


def test_only_routed_experts_run_packed():
    m = build_moe("qwen3_moe")
    lowbit.quantize(m, "int4-weight-only")
    rt.convert(m)
    calls: dict[str, int] = {}
    hooks = [x.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, i[0].shape[0]))
             for n, x in m.named_modules() if n.endswith("down_proj") and ".experts." in n]
    ex = m.model.layers[0].mlp.experts
    ex.track_tokens = True
    with torch.no_grad():
        m(IDS[:1, :1])  # one token: top-2 of 4 experts per layer
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * 2 and set(calls.values()) == {1}
    assert int((ex.routed_tokens > 0).sum()) == 2
    assert all(f"layers.0.mlp.experts.{e}.down_proj" in " ".join(calls)
               for e in ex.routed_tokens.nonzero().flatten().tolist())


def test_report_names_fused_experts_left_float():
    m = build_moe("mixtral")
    report = rt.convert(m)  # never quantized: experts still stacked 3-D
    assert report == {} and report.fused_experts == [
        "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert any("left fused in float" in line for line in report.lines())
