"""Automatic mixed precision: per-layer sensitivity and a search that meets a size budget.

>>> from lowbit.search import auto_quantize                                   # doctest: +SKIP
>>> model, recipe = auto_quantize(model, ["bf16", "int8-weight-only", "int4-awq",
...                               "nvfp4-weight-only"], 5.0, forward_loop)      # doctest: +SKIP
>>> lowbit.recipes.save(recipe, "auto.yaml")                                 # doctest: +SKIP

* :func:`sensitivity` -- loss increase (nats/token) of each linear layer quantized alone with
  each candidate, measured or estimated (empirical Fisher of the output error);
* :func:`auto_recipe` -- the recipe of least predicted loss at a bits-per-weight budget
  (multiple-choice knapsack), with a report; what ``lowbit quantize --auto BITS`` calls;
* :func:`auto_quantize` -- the same, applied to the model.

See ``docs/auto_quantize.md``.
"""

from lowbit.search.auto import (auto_quantize, auto_recipe, build_recipe, choose,
                                effective_bits, predicted_loss)
from lowbit.search.candidates import FLOAT_NAMES, Candidate, parse_candidates
from lowbit.search.knapsack import solve
from lowbit.search.sensitivity import Sensitivity, mean_loss, sensitivity, spearman

__all__ = ["FLOAT_NAMES", "Candidate", "Sensitivity", "auto_quantize", "auto_recipe",
           "build_recipe", "choose", "effective_bits", "mean_loss", "parse_candidates",
           "predicted_loss", "sensitivity", "solve", "spearman"]
