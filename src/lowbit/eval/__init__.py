"""Evaluation: perplexity, comparison with a baseline, weight footprint, memory estimates."""

from lowbit.eval.footprint import weight_footprint
from lowbit.eval.memory import estimate, kv_cache_bytes, weight_bytes
from lowbit.eval.perplexity import compare, perplexity

__all__ = ["compare", "estimate", "kv_cache_bytes", "perplexity", "weight_bytes",
           "weight_footprint"]
