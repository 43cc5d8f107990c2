"""GPTQ/AWQ on models with nn.MultiheadAttention: self-attention is calibrated through the
packed in-projection; cross-attention is refused by name (its key/value parts would get the
query's statistics)."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CalibrationError
from lowbit.nn.mha import QuantMultiheadAttention
from tests.vision_models import TinyViT, calib_loop, images


def _err(recipe):
    m = TinyViT().eval()
    x = torch.cat([images(2, seed=s) for s in (1, 2)])  # the calibration images
    ref = m(x)
    kw = {} if recipe == "int8-smoothquant" else {"group_size": 32}
    lowbit.quantize(m, recipe, calib_loop(), **kw)
    assert isinstance(m.blocks[0].attn, QuantMultiheadAttention)
    out = m(x)
    return ((out - ref).pow(2).mean() / ref.pow(2).mean()).item()


def test_self_attention_vit_gptq_beats_rtn():
    """GPTQ compensates through the packed in-projection (query = key = value): on the
    calibration images its output error is below round-to-nearest's."""
    gptq, rtn = _err("int4-gptq"), _err("int4-weight-only")
    assert 0 < gptq < rtn


def test_self_attention_vit_smoothquant_runs():
    assert 0 < _err("int8-smoothquant") < 0.05


class _Cross(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_CrossBlock() for _ in range(2))

    def forward(self, x):
        mem = x.flip(1)
        for b in self.blocks:
            x = b(x, mem)
        return x


class _CrossBlock(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, mem):
        y = self.ln(x)
        return x + self.fc(self.attn(y, mem, mem, need_weights=False)[0])


def test_cross_attention_is_refused_by_gptq():
    m = _Cross().eval()
    data = [torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]

    def loop(model):
        for d in data:
            model(d)

    with pytest.raises(CalibrationError, match=r"attn: nn.MultiheadAttention .*cross-attention"):
        lowbit.quantize(m, "int4-gptq", loop)
