"""QAT and QAD with transformers' Trainer on a tiny model (one or two optimizer steps)."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

import lowbit  # noqa: E402
from lowbit.training import finalize_qat, prepare_qat, scale_parameters  # noqa: E402
from tests.tiny_models import build, calib_ids, loop_over  # noqa: E402


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i],
                "attention_mask": torch.ones_like(self.ids[i])}


def _args(tmp_path, steps=2):
    return TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps,
                             per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)


def test_trainer_step_on_qat_model(tmp_path):
    torch.manual_seed(0)
    m = build("llama")
    prepare_qat(m, "w4a8", loop_over(calib_ids(2, 16)), scales="learnable", group_size=32)
    w0 = m.model.layers[1].self_attn.o_proj.weight.detach().clone()
    s0 = [p.detach().clone() for p in scale_parameters(m)]
    tr = Trainer(model=m, args=_args(tmp_path), train_dataset=_Rows(calib_ids(4, 16, seed=5)))
    out = tr.train()
    assert out.global_step == 2 and out.training_loss > 0
    assert not torch.equal(m.model.layers[1].self_attn.o_proj.weight, w0)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(scale_parameters(m), s0))
    finalize_qat(m)
    lowbit.save(m, tmp_path / "ck")
    m.eval()
    ids = calib_ids(1, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "ck")(ids).logits, m(ids).logits)


def test_qad_trainer_step(tmp_path):
    from lowbit.training.hf import QADTrainer

    torch.manual_seed(0)
    teacher = build("llama")
    m = prepare_qat(copy.deepcopy(teacher), "int4-weight-only", group_size=16)
    tr = QADTrainer(model=m, teacher=teacher, temperature=2.0, alpha=0.5,
                    args=_args(tmp_path, steps=1),
                    train_dataset=_Rows(calib_ids(2, 16, seed=6)))
    out = tr.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert all(not p.requires_grad for p in teacher.parameters())
