"""ggml's own quantizers through ctypes (``ggml_quantize_chunk`` in llama.cpp's libggml-base).

The library is the one bench/gguf_contest.py uses: ``$LOWBIT_LLAMA_BIN`` or
``../cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin`` next to the
repository. ``ggml_quantize(...)`` returns None when it is not there (tests skip).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LLAMA_BIN = Path(os.environ.get("LOWBIT_LLAMA_BIN", ROOT.parent / "cache" / "llamacpp" /
                                "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" /
                                "bin"))


@lru_cache(maxsize=1)
def libggml():
    """The loaded libggml-base (ctypes.CDLL) or None when it is not built."""
    path = LLAMA_BIN / "libggml-base.so"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


def ggml_quantize(ggml_type: int, type_size: int, block: int, w: np.ndarray,
                  imatrix: np.ndarray | None = None) -> np.ndarray | None:
    """ggml's bytes uint8 [O, I/block*type_size] of float32 ``w`` [O, I] (imatrix [I] or None)."""
    lib = libggml()
    if lib is None:
        return None
    w = np.ascontiguousarray(w, dtype=np.float32)
    n_rows, n_cols = w.shape
    out = np.zeros((n_rows, n_cols // block * type_size), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    n = lib.ggml_quantize_chunk(ggml_type, w.ctypes.data, out.ctypes.data, 0, n_rows, n_cols,
                                None if im is None else im.ctypes.data)
    assert n == out.nbytes, (n, out.nbytes)
    return out
