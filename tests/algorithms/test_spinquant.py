"""The ``spinquant`` step: learned R1/R2 (Cayley SGD on the quantized model's loss)."""

from types import SimpleNamespace

import pytest
import torch

import lowbit
import lowbit.algorithms.spinquant as sq  # registers the step
from lowbit.core.rotation import is_orthogonal, rotation_matrix
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn.utils import quantizers
from tests.tiny_models import build, calib_ids, loop_over


def _recipe(fmt="nvfp4", weight_only=False, **args):
    t = {"pattern": "*", "weight": {"format": fmt}}
    if not weight_only:
        t["input"] = {"format": fmt}
    return {"name": "spin", "targets": [t],
            "algorithms": [{"name": "spinquant", "args": {"steps": 3, **args}}]}


def _outlier_model():
    """Tiny Llama with a confident head and an outlier channel in every norm's output."""
    m = build("llama")
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
        for layer in m.model.layers:
            layer.input_layernorm.weight[3] = 30.0
            layer.post_attention_layernorm.weight[7] = 30.0
    return m


def _own_text(m, n=4, length=32):
    """Token ids sampled from ``m`` itself (its float loss on them is low)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ids = torch.randint(0, 128, (n, 1), generator=g)
        for _ in range(length - 1):
            p = torch.softmax(m(ids).logits[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


@pytest.mark.parametrize("args", [{}, {"r3": True, "block": 16}, {"r2": False, "r4": False},
                                  {"batch": 1}])
def test_float_function_unchanged(args):
    model = _outlier_model()
    ids = _own_text(model)
    with torch.no_grad():
        ref = model(ids).logits
        emb = model.model.embed_tokens.weight.detach().clone()
    lowbit.quantize(model, _recipe(**args), forward_loop=loop_over(ids))
    rot = model.lowbit_report.rotations
    learned = rot["learned"]
    assert learned["steps"] == 3 and len(learned["loss_history"]) == 4
    assert learned["loss_after"] <= learned["loss_before"]
    if args.get("batch"):  # the last entry is the loss on all rows after training
        assert learned["loss_history"][-1] == learned["loss_after"] or \
            learned["best_step"] == 0
    for _, q in quantizers(model):
        q.disable()
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-4
    # the learned R1 is in the embedding (E' = E @ R1; E is not changed by the norm folding)
    with torch.no_grad():
        r1 = torch.linalg.lstsq(emb.double(), model.model.embed_tokens.weight.double()).solution
    assert is_orthogonal(r1, tol=1e-4)
    moved = not torch.allclose(r1, rotation_matrix("hadamard", 64), atol=1e-3)
    assert moved == (rot["learned"]["best_step"] > 0)
    assert moved or (args and not args.get("batch"))  # on this model, training moves R


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gemma2", "phi3", "granite"])
def test_float_function_unchanged_families(family):
    """Random (not Hadamard) initial matrices: the general path, Gemma's post-norm R1 online
    (kind "matrix"), Phi-3's fused qkv_proj (R2 on its value rows)."""
    model = build(family)
    ids = calib_ids(4, 16)
    with torch.no_grad():
        ref = model(ids).logits
    lowbit.quantize(model, _recipe(kind="random", r3=True, steps=2), forward_loop=loop_over(ids))
    for _, q in quantizers(model):
        q.disable()
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-4
    rot = model.lowbit_report.rotations
    assert rot["online"]["qk"] == 2 and rot["online"]["input"] == 2
    if family.startswith("gemma"):
        from lowbit.nn.rotation import online_rotations

        kinds = {v["kind"] for k, v in online_rotations(model).items() if v["where"] ==
                 "norm_output"}
        assert rot["online"]["norm_output"] == 4 and kinds == {"matrix"}


def test_cayley_steps_stay_orthogonal():
    g = torch.Generator().manual_seed(0)
    r = rotation_matrix("hadamard", 64)
    for _ in range(200):
        r = sq.cayley_sgd_step(r, torch.randn(64, 64, generator=g, dtype=torch.float64), 1.5)
    assert is_orthogonal(r, tol=1e-6)
    # no gradient across the group (G r^T symmetric): no move
    s = torch.randn(64, 64, generator=g, dtype=torch.float64)
    assert torch.allclose(sq.cayley_sgd_step(r, (s + s.T) @ r, 1.5), r, atol=1e-12)


def test_learned_rotation_lowers_the_quantized_loss():
    ids = _own_text(_outlier_model())
    loss = {}
    for steps in (0, 10):  # 0: the initial Hadamard rotations, untrained
        m = _outlier_model()
        lowbit.quantize(m, _recipe(steps=steps), forward_loop=loop_over(ids))
        with torch.no_grad():  # the whole pipeline: static input scales calibrated after
            loss[steps] = float(m(ids, labels=ids).loss)
        learned = m.lowbit_report.rotations["learned"]
        assert learned["loss_after"] <= learned["loss_before"]
    assert loss[10] < loss[0] - 0.03, loss


def test_needs_data():
    with pytest.raises(CalibrationError, match="spinquant"):
        lowbit.quantize(build("llama"), _recipe(weight_only=True))


def test_unknown_or_bad_args():
    with pytest.raises(ConfigError, match="stepz"):
        lowbit.quantize(build("llama"), _recipe(stepz=3), forward_loop=loop_over(calib_ids()))
    model = build("llama")
    for args in ({"stepz": 3}, {"lr": -1.0}, {"kind": "walsh"}, {"block": 1}, {"batch": 0}):
        with pytest.raises(ConfigError):
            sq.spinquant_step(model, SimpleNamespace(args=args), loop_over(calib_ids()), None)


def test_refuses_a_calibrated_model_and_layerless_families():
    model = build("llama")
    lowbit.quantize(model, "nvfp4", forward_loop=loop_over(calib_ids()))
    with pytest.raises(ConfigError, match="spinquant"):
        sq.spinquant_step(model, SimpleNamespace(args={}), loop_over(calib_ids()), None)
    with pytest.raises(ConfigError, match="LayerNorm|cannot be rotated"):
        lowbit.quantize(build("gpt2"), _recipe(), forward_loop=loop_over(calib_ids()))


@pytest.mark.parametrize("head_hook", [False, True])
def test_gradient_reaches_r1_only_through_the_quantizers(head_hook):
    """With every quantizer off the rotated model's loss does not depend on R1: its Riemannian
    gradient vanishes; with them on (straight-through estimators) it does not."""
    from lowbit.algorithms.rotate_layout import fold_norms, rotation_layout
    from lowbit.nn.swap import apply_recipe

    model = _outlier_model()
    ids = _own_text(model)
    apply_recipe(model, lowbit.recipes.load("nvfp4"))
    layout = rotation_layout(model)
    plan = sq._plan(layout, model if head_hook else None)  # lm_head is not quantized
    assert plan.head_hook == head_hook
    fold_norms(model, layout)
    r1 = rotation_matrix("random", 64, seed=3)
    norms = {}
    for on in (False, True):
        for _, q in quantizers(model):
            q.enable() if on else q.disable()
        hold = {"r1": r1}
        base = sq._base_weights(model, plan, None)
        with sq._training_state(model, plan, hold, None):
            _, g, _ = sq._pass(model, plan, base, hold, r1, None, [(ids, None)], True)
        norms[on] = float((r1 @ g.T - g @ r1.T).norm() / g.norm())
    assert norms[False] < 1e-5 and norms[True] > 1e-2, norms


def test_refuses_a_second_rotation_step():
    rec = _recipe()
    rec["algorithms"].insert(0, {"name": "rotate"})
    with pytest.raises(ConfigError, match="already rotated"):
        lowbit.quantize(build("llama"), rec, forward_loop=loop_over(calib_ids()))
