"""The real model and texts: loading, tokenizing, calibration batches, forward loops."""

from lowbit.data.models import cache_dir, default_gguf, load_model, model_dir
from lowbit.data.text import (calibration_batches, default_demo_text, forward_loop_from_batches,
                              read_text, split_tokens, tokenize, windows_from_ids)

__all__ = ["cache_dir", "calibration_batches", "default_demo_text", "default_gguf",
           "forward_loop_from_batches", "load_model", "model_dir", "read_text", "split_tokens",
           "tokenize", "windows_from_ids"]
