import os

import pytest
import torch

torch.manual_seed(0)
# tests use small tensors: one thread avoids OpenMP spin-waiting on a loaded 2-core machine
# (5-10x faster here); benchmarks set their own thread count
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def all_f16_bf16() -> torch.Tensor:
    """Every float16 and every bfloat16 bit pattern, as float32 (131,072 values, exact)."""
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    return torch.cat([bits.view(torch.float16).float(), bits.view(torch.bfloat16).float()])
