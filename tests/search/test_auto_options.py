"""auto_recipe / auto_quantize: a keyword they do not take is a ConfigError naming it."""

import pytest
from torch import nn

from lowbit.errors import ConfigError
from lowbit.search import auto_quantize, auto_recipe
from lowbit.search.auto import SENSITIVITY_ARGS


def test_sensitivity_args_are_sensitivitys_keywords():
    assert {"method", "group_size", "check", "progress", "seed"} <= set(SENSITIVITY_ARGS)
    assert not {"model", "candidates", "forward_loop"} & set(SENSITIVITY_ARGS)


@pytest.mark.parametrize("fn", [auto_recipe, auto_quantize])
def test_misspelt_keyword_raises_before_any_work(fn):
    def loop(model):  # the check comes before any forward pass
        raise AssertionError("ran")

    with pytest.raises(ConfigError, match=r"auto_recipe: unknown option 'metod' \(did you mean "
                                          r"'method'\?\); it takes: sens, name, method, "):
        fn(nn.Linear(8, 8), ["int8-weight-only"], 8.0, loop, metod="fisher")
    with pytest.raises(ConfigError, match="unknown option 'group'"):
        fn(nn.Linear(8, 8), ["int8-weight-only"], 8.0, loop, group=32)
