"""prepare_qat / finalize_qat on tiny seeded transformers models: modes, training lowers
the loss, QAD, export after QAT round-trips bit for bit."""

import copy

import pytest
import torch

import lowbit
from lowbit.errors import ConfigError
from lowbit.nn import TensorQuantizer
from lowbit.training import (QATQuantizer, distill_loss, finalize_qat, param_groups,
                             prepare_qat, scale_parameters)
from tests.tiny_models import build, calib_ids, loop_over

IDS = calib_ids(4, 24, seed=3)


def _w4a8(scales="frozen", family="llama"):
    m = build(family)
    return prepare_qat(m, "w4a8", loop_over(calib_ids(2, 16)), scales=scales, group_size=32)


def _train(m, steps=12, lr=3e-3, loss_fn=None):
    m.train()
    opt = torch.optim.Adam(param_groups(m, lr), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(m) if loss_fn else m(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    m.eval()
    return losses


def test_prepare_modes():
    m = _w4a8("frozen")
    rep = m.lowbit_qat
    assert len(rep["frozen"]) == 28 and not rep["learnable"]  # 14 linears x (weight, input)
    q = m.model.layers[0].mlp.up_proj.weight_quantizer
    assert isinstance(q, QATQuantizer) and q.scale is not None and q.scale.shape == (128, 2)
    assert not isinstance(q.scale, torch.nn.Parameter)
    m = _w4a8("learnable")
    assert len(m.lowbit_qat["learnable"]) == 28
    assert len(scale_parameters(m)) == 28
    assert isinstance(m.model.layers[0].mlp.up_proj.input_quantizer.amax, torch.nn.Parameter)
    m = _w4a8("absmax")
    assert len(m.lowbit_qat["absmax"]) == 14
    assert m.model.layers[0].mlp.up_proj.weight_quantizer.scale is None


def test_prepared_model_computes_what_ptq_computes():
    ptq = build("llama")
    lowbit.quantize(ptq, "w4a8", loop_over(calib_ids(2, 16)), group_size=32)
    for scales in ("frozen", "learnable", "absmax"):
        m = _w4a8(scales)
        with torch.no_grad():
            assert torch.equal(m(IDS).logits, ptq(IDS).logits), scales
        assert torch.equal(m(IDS).logits, ptq(IDS).logits), scales  # grad mode: same values


@pytest.mark.parametrize("scales", ["frozen", "learnable", "absmax"])
def test_qat_steps_lower_the_loss(scales):
    torch.manual_seed(0)
    m = _w4a8(scales)
    w0 = m.model.layers[0].mlp.up_proj.weight.detach().clone()
    q = m.model.layers[0].mlp.up_proj.weight_quantizer
    s0 = None if q.scale is None else q.scale.detach().clone()
    losses = _train(m)
    assert losses[-1] < 0.9 * losses[0], losses
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, w0)
    if scales == "frozen":
        assert torch.equal(q.scale, s0)
    if scales == "learnable":
        assert not torch.equal(q.scale.detach(), s0)
        assert all(p.grad is not None for p in scale_parameters(m))


@pytest.mark.parametrize("scales", ["frozen", "learnable"])
def test_qad_distillation_reduces_kl_to_teacher(scales):
    torch.manual_seed(0)
    teacher = build("llama")
    with torch.no_grad():  # peaked next-token distributions, as a trained model has
        teacher.lm_head.weight.mul_(30)
    m = prepare_qat(copy.deepcopy(teacher), "int4-weight-only", scales=scales,
                    group_size=16)
    with torch.no_grad():
        t = teacher(IDS).logits

    def kl(model):
        return distill_loss(model(IDS).logits, t)

    losses = _train(m, steps=10, lr=1e-5, loss_fn=kl)
    assert losses[-1] < 0.6 * losses[0], losses


def test_distill_loss_values():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert float(distill_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    pt = t.softmax(-1)
    manual = (pt * (pt.log() - s.log_softmax(-1))).sum(-1).mean()
    assert float(distill_loss(s, t)) == pytest.approx(float(manual), rel=1e-5)
    pt2 = (t / 2).softmax(-1)
    manual2 = (pt2 * (pt2.log() - (s / 2).log_softmax(-1))).sum(-1).mean() * 4
    assert float(distill_loss(s, t, T=2.0)) == pytest.approx(float(manual2), rel=1e-5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    kl = (pt * (pt.log() - s.log_softmax(-1))).sum(-1)
    assert float(distill_loss(s, t, mask=mask)) == pytest.approx(float(kl[0, :2].mean()), rel=1e-5)
    with pytest.raises(ConfigError, match="differ in shape"):
        distill_loss(s, t[:, :4])
    with pytest.raises(ConfigError, match="positive"):
        distill_loss(s, t, T=0)


def test_finalize_then_export_round_trips(tmp_path):
    torch.manual_seed(0)
    m = _w4a8("learnable")
    _train(m, steps=4)
    with torch.no_grad():
        before = m(IDS).logits
    keys_before = set(m.state_dict())
    finalize_qat(m)
    assert not any(isinstance(q, QATQuantizer) for q in m.modules())
    assert all(type(q) is TensorQuantizer for q in m.modules() if isinstance(q, TensorQuantizer))
    assert not any("quantizer" in n for n, _ in m.named_parameters())
    assert set(m.state_dict()) == keys_before
    with torch.no_grad():
        after = m(IDS).logits
    assert torch.equal(before, after)
    lowbit.save(m, tmp_path / "ck")
    back = lowbit.load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, after)
    # a second round of QAT can start from the finalized model
    prepare_qat(m, scales="learnable")
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, after)


def test_frozen_export_round_trips_gpt2(tmp_path):
    m = _w4a8("frozen", family="gpt2")
    _train(m, steps=3)
    finalize_qat(m)
    with torch.no_grad():
        ref = m(IDS).logits
    lowbit.save(m, tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "g")(IDS).logits, ref)


def test_prepare_errors():
    with pytest.raises(ConfigError, match="no quantizers"):
        prepare_qat(build("llama"))
    m = _w4a8()
    with pytest.raises(ConfigError, match="already quantized"):
        prepare_qat(m, "int8")
    with pytest.raises(ConfigError, match="already applied"):
        prepare_qat(m)
    with pytest.raises(ConfigError, match="scales must be one of"):
        prepare_qat(build("llama"), "int8-dynamic", scales="lsq")
    with pytest.raises(ConfigError, match="no quantizer has a learnable scale"):
        prepare_qat(build("llama"), "nvfp4-weight-only", scales="learnable")
