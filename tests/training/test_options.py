"""Training entry points: options they do not understand, or would not use, are errors."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ConfigError
from lowbit.training import convert_to_fp8, fp8_autocast, prepare_qat
from tests.tiny_models import build


def test_prepare_qat_rejects_overrides_it_would_not_use():
    m = build("llama")
    lowbit.quantize(m, "int4-weight-only", group_size=32)
    with pytest.raises(ConfigError, match=r"prepare_qat\(recipe=None\): the model is already "
                                          r"quantized, so group_size would not be used"):
        prepare_qat(m, group_size=64)  # before: silently ignored
    with pytest.raises(ConfigError, match="so calib_data would not be used"):
        prepare_qat(m, calib_data=torch.zeros(1, 4, dtype=torch.long))
    assert not any(type(q).__name__ == "QATQuantizer" for q in m.modules())
    prepare_qat(m)  # fine without them


def test_misspelt_recipe_override_raises():
    """Recipe overrides (lowbit.quantize, prepare_qat) are checked by lowbit.recipes.load."""
    with pytest.raises(ConfigError, match="unknown recipe override 'grup_size'"):
        prepare_qat(build("llama"), "int4-weight-only", grup_size=32)
    with pytest.raises(ConfigError, match="unknown recipe override 'kv_cahce'"):
        lowbit.quantize(build("llama"), "int8", kv_cahce="fp8")


def test_fp8_overrides_are_checked():
    seq = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ConfigError, match=r"fp8 recipe: unknown key .amax_histroy_len. \(did you "
                                          r"mean .amax_history_len.\?\)"):
        convert_to_fp8(seq, amax_histroy_len=4)
    with pytest.raises(ConfigError, match="unknown key 'scaled_mm'"):
        with fp8_autocast(seq, scaled_mm=False):
            pass
