"""Checkpoints that engines load: native lowbit, compressed-tensors, GGUF, ONNX QDQ.

>>> lowbit.export.save(model, "out/", format="compressed-tensors")   # doctest: +SKIP
"""

from lowbit.export.base import (atomic_dir, exporter_names, get_exporter, quantized_modules,
                                register_exporter, save, weight_qtensor)

from lowbit.export.native import load  # noqa: E402

__all__ = ["load", "atomic_dir", "exporter_names", "get_exporter", "quantized_modules",
           "register_exporter", "save", "weight_qtensor"]
