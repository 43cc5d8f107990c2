"""The real model and texts: loading, tokenizing, calibration batches, forward loops.

* :func:`load_model` -- ``(model, tokenizer)``: the packaged SmolLM2-135M (converted once and
  cached), a transformers folder, a lowbit checkpoint or a ``.gguf`` file; never a hub.
* :func:`read_text`, :func:`tokenize`, :func:`split_tokens` -- a file's token ids, split 80/20
  into calibration and held-out evaluation parts.
* :func:`calibration_batches`, :func:`forward_loop_from_batches` -- seeded calibration windows
  ``[n_samples, seq_len]`` and the ``forward_loop(model)`` that :func:`lowbit.quantize` takes.
* :func:`sample_text`, :func:`sample_text_names`, :func:`sample_info` -- public-domain texts
  packaged with lowbit (``"austen_pp"``: *Pride and Prejudice*, 684k characters); the string
  ``"sample:austen_pp"`` names it wherever a text or text file is taken.
* :func:`default_demo_text` -- ~200k characters of standard-library docstrings.
* :func:`upcycle_moe` -- a Mixtral-style MoE (E identical experts per block, seeded router)
  computing the same function as a dense Llama-like model: a real MoE to measure on offline.
"""

from lowbit.data.models import cache_dir, default_gguf, load_model, model_dir
from lowbit.data.samples import (SAMPLE_PREFIX, SampleInfo, sample_info, sample_text,
                                 sample_text_names)
from lowbit.data.text import (batches_from_tensors, calibration_batches, default_demo_text,
                              forward_loop_from_batches, read_text, split_tokens, tokenize,
                              tokenizer_fingerprint, windows_from_ids)
from lowbit.data.upcycle import upcycle_moe

__all__ = ["batches_from_tensors", "cache_dir", "calibration_batches", "default_demo_text",
           "default_gguf", "forward_loop_from_batches", "load_model", "model_dir", "read_text",
           "SAMPLE_PREFIX", "SampleInfo", "sample_info", "sample_text", "sample_text_names",
           "split_tokens", "tokenize", "tokenizer_fingerprint", "upcycle_moe",
           "windows_from_ids"]
