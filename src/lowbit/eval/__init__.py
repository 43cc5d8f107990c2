"""Evaluation: perplexity, comparison with a baseline, weight footprint, memory estimates.

* :func:`perplexity` -- ``exp(mean NLL)`` (nats/token) over windows of token ids ``[n]``.
* :func:`compare` -- a model against its baseline: perplexities, delta %, mean
  KL(baseline || model), top-1 agreement.
"""

from lowbit.eval.footprint import weight_footprint
from lowbit.eval.memory import estimate, kv_cache_bytes, weight_bytes
from lowbit.eval.perplexity import compare, perplexity

__all__ = ["compare", "estimate", "kv_cache_bytes", "perplexity", "weight_bytes",
           "weight_footprint"]
