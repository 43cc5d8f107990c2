"""A frozen weight with a learnable (LSQ) scale must still give the scale a gradient."""

import torch

import lowbit
from lowbit.training import prepare_qat


def test_frozen_weight_learnable_scale_gets_gradient():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 16))
    lowbit.quantize(m, "int4-weight-only", group_size=16)
    prepare_qat(m, scales="learnable")
    m[0].weight.requires_grad_(False)
    params = [p for n, p in m.named_parameters() if p.requires_grad]
    assert params, "no learnable scale"
    m(torch.randn(4, 32)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
