"""llama.cpp importance-matrix files: read and write ``imatrix.gguf`` (and read ``.dat``).

>>> data = read_imatrix("imatrix.gguf")                       # doctest: +SKIP
>>> s, n = data["blk.0.attn_q.weight"]      # in_sum2 [n_mat, I] float32, counts [n_mat]
>>> mean_sq = imatrix_means(s, n)           # [n_mat, I]: what llama-quantize weights by

The GGUF file is what ``llama-imatrix`` writes (tools/imatrix/imatrix.cpp,
``save_imatrix``; read back by common/imatrix-loader.cpp): metadata ``general.type =
"imatrix"``, ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (uint32), no ``general.architecture``; for every weight tensor
``NAME`` (a llama.cpp tensor name such as ``blk.0.ffn_down.weight``, or
``blk.0.ffn_down_exps.weight`` for stacked experts) two F32 tensors:

* ``NAME.in_sum2``: ggml ``ne = {I, n_mat}`` (numpy ``[n_mat, I]``): the sum over every
  token the matrix saw of ``x_i^2`` (its input activation squared), per input column ``i``
  and per matrix (``n_mat`` = 1, or the number of experts, each counting its own tokens);
* ``NAME.counts``: ggml ``ne = {1, n_mat}`` (numpy ``[n_mat, 1]``): the number of tokens
  summed (a float holding an integer).

llama-quantize divides: importance = ``in_sum2 / counts`` (1 where a count is 0).

The legacy ``.dat`` format (``--output-format dat``; read only): ``int32 n_entries``, then
per entry ``int32 len, name, int32 ncall, int32 nval, float32[nval]`` holding
``mean(x^2) * ncall``, then optionally ``int32 chunk_count, int32 len, dataset``. It does
not say how the values split among experts: it reads as ``in_sum2 [1, nval]``,
``counts [ncall]``, so the means come out the same way.

Nothing but these two layouts is parsed (no pickle); a malformed file is a
:class:`~lowbit.errors.CheckpointError` naming the file and what was wrong; files are
written to a temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from lowbit.errors import CheckpointError, ConfigError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"
GGUF_MAGIC = b"GGUF"


def read_imatrix(path: str | os.PathLike, with_meta: bool = False):
    """Entries of a llama.cpp imatrix file (GGUF, or the legacy ``.dat``).

    Returns ``{tensor name: (in_sum2 float32 [n_mat, I], counts float32 [n_mat])}`` with
    tensor names as llama.cpp spells them (``blk.0.attn_q.weight``); with ``with_meta``,
    ``(entries, meta)`` where ``meta`` holds ``datasets`` (list of str), ``chunk_count``,
    ``chunk_size`` (int or None) and ``legacy`` (bool).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"imatrix file {str(p)!r} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    entries, meta = (_read_gguf(p) if magic == GGUF_MAGIC else _read_legacy(p))
    if not entries:
        raise CheckpointError(f"imatrix file {str(p)!r} holds no entries")
    return (entries, meta) if with_meta else entries


def imatrix_means(in_sum2: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Importance per input column as llama-quantize computes it: ``in_sum2 / counts``
    row by row (``[n_mat, I]`` / ``[n_mat]`` -> float32 ``[n_mat, I]``), 1 where a matrix
    saw no token (tools/quantize/quantize.cpp, ``load_imatrix``). For a legacy entry
    (``in_sum2 [1, nval]``, ``counts [ncall]``) this is ``sums / ncall``, as there."""
    s = np.asarray(in_sum2, dtype=np.float32)
    c = np.asarray(counts, dtype=np.float32).reshape(-1)
    if s.ndim != 2 or s.shape[0] != c.shape[0]:
        raise ConfigError(f"imatrix entry: in_sum2 shape {list(s.shape)} and counts shape "
                          f"{list(c.shape)}; expected [n_mat, I] and [n_mat]")
    out = np.ones_like(s)
    ok = c > 0
    out[ok] = s[ok] / c[ok, None]
    return out


def write_imatrix(path: str | os.PathLike, data: dict, dataset: str | list[str] | None = None,
                  chunks: int = 0, chunk_size: int = 0) -> None:
    """Write ``data`` (``{tensor name: (in_sum2 [n_mat, I] or [I], counts [n_mat] or a
    number)}``) as an imatrix GGUF file that llama-quantize reads (``--imatrix``).

    ``dataset``: the calibration text's name(s) (``imatrix.datasets``); ``chunks``: the
    number of chunks of ``chunk_size`` tokens the sums were computed on (llama-imatrix's
    ``imatrix.chunk_count`` / ``imatrix.chunk_size``). Entries are written in sorted name
    order, as llama-imatrix does. The file appears atomically (temporary name + rename).
    """
    import gguf

    if not isinstance(data, dict) or not data:
        raise ConfigError("write_imatrix: data must be a non-empty dict {tensor name: "
                          "(in_sum2, counts)}")
    datasets = [] if dataset is None else [dataset] if isinstance(dataset, str) else \
        [str(d) for d in dataset]
    for what, v in (("chunks", chunks), ("chunk_size", chunk_size)):
        if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2 ** 32:
            raise ConfigError(f"write_imatrix: {what} = {v!r}; expected an integer >= 0")
    arrays = []
    for name in sorted(data):
        s, c = _entry(name, data[name])
        arrays.append((name + SUFFIX_SUMS, s))
        arrays.append((name + SUFFIX_COUNTS, c.reshape(-1, 1)))
    p = Path(path)
    if not p.parent.is_dir():
        raise ConfigError(f"write_imatrix: folder {str(p.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "imatrix")
        # llama-imatrix writes no general.architecture: only general.type and imatrix.*
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, datasets)
        w.add_uint32(KEY_CHUNK_COUNT, int(chunks))
        w.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
        for tname, arr in arrays:
            w.add_tensor(tname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, p)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def _entry(name: str, value) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"write_imatrix: tensor name {name!r}; expected a non-empty str")
    try:
        s, c = value
    except (TypeError, ValueError):
        raise ConfigError(f"write_imatrix: entry {name!r} must be (in_sum2, counts)") from None
    s = np.asarray(_numpy(s), dtype=np.float32)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    c = np.asarray(_numpy(c), dtype=np.float32).reshape(-1)
    if s.ndim != 2 or s.shape[1] == 0 or c.shape[0] != s.shape[0]:
        raise ConfigError(f"write_imatrix: entry {name!r}: in_sum2 shape {list(s.shape)}, "
                          f"counts shape {list(c.shape)}; expected [n_mat, I] and [n_mat]")
    if not (np.isfinite(s).all() and np.isfinite(c).all()) or (c < 0).any() or (s < 0).any():
        raise ConfigError(f"write_imatrix: entry {name!r} holds negative or non-finite "
                          "values (sums of squares and token counts are >= 0)")
    return np.ascontiguousarray(s), np.ascontiguousarray(c)


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def _read_gguf(p: Path):
    import gguf

    try:
        r = gguf.GGUFReader(p)
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
        raise CheckpointError(f"imatrix file {str(p)!r} is not a readable GGUF file: "
                              f"{type(e).__name__}: {e}") from None
    meta = {"datasets": [], "chunk_count": None, "chunk_size": None, "legacy": False}
    f = r.fields.get(KEY_DATASETS)
    if f is not None:
        meta["datasets"] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    for key, k in ((KEY_CHUNK_COUNT, "chunk_count"), (KEY_CHUNK_SIZE, "chunk_size")):
        f = r.fields.get(key)
        if f is not None:
            meta[k] = int(f.parts[f.data[0]][0])
    sums, counts = {}, {}
    for t in r.tensors:
        for suffix, into in ((SUFFIX_SUMS, sums), (SUFFIX_COUNTS, counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise CheckpointError(f"imatrix file {str(p)!r}: tensor {t.name} is "
                                          f"{t.tensor_type.name}; expected F32")
                ne = [int(n) for n in t.shape]  # ggml order: ne0 first
                arr = np.array(t.data, dtype=np.float32).reshape(
                    int(np.prod(ne[1:])) if len(ne) > 1 else 1, ne[0])
                into[t.name[:-len(suffix)]] = arr
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise CheckpointError(f"imatrix file {str(p)!r}: {odd} has "
                              f"{'in_sum2' if odd in sums else 'counts'} but no "
                              f"{'counts' if odd in sums else 'in_sum2'}")
    out = {}
    for name, s in sums.items():
        c = counts[name].reshape(-1)
        if s.size % c.size:
            raise CheckpointError(f"imatrix file {str(p)!r}: {name} has {s.size} sums for "
                                  f"{c.size} counts (not a multiple)")
        out[name] = (s.reshape(c.size, -1), np.rint(c).astype(np.float32))
    return out, meta


def _read_legacy(p: Path):
    buf = p.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(buf):
            raise CheckpointError(f"imatrix file {str(p)!r} (legacy .dat) is truncated "
                                  f"reading {what} at byte {pos}")
        v = struct.unpack_from(fmt, buf, pos)
        pos += n
        return v

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1 or n_entries > 1_000_000:
        raise CheckpointError(f"imatrix file {str(p)!r} is neither GGUF nor a legacy .dat "
                              f"imatrix (entry count {n_entries})")
    out = {}
    for i in range(n_entries):
        (ln,) = take("<i", f"entry {i}'s name length")
        if not 0 < ln < 4096:
            raise CheckpointError(f"imatrix file {str(p)!r}: entry {i} has a name length "
                                  f"{ln}; expected 1..4095")
        name = bytes(take(f"<{ln}s", f"entry {i}'s name")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii", f"{name}'s ncall/nval")
        if nval < 1:
            raise CheckpointError(f"imatrix file {str(p)!r}: {name} has {nval} values")
        vals = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos) \
            if pos + 4 * nval <= len(buf) else None
        if vals is None:
            raise CheckpointError(f"imatrix file {str(p)!r} (legacy .dat) is truncated in "
                                  f"{name}'s values")
        pos += 4 * nval
        out[name] = (vals.astype(np.float32).reshape(1, nval),
                     np.asarray([max(ncall, 1)], dtype=np.float32))  # 0: sums as is
    meta = {"datasets": [], "chunk_count": None, "chunk_size": None, "legacy": True}
    if pos + 4 <= len(buf):
        (meta["chunk_count"],) = take("<i", "the chunk count")
        if pos + 4 <= len(buf):
            (ln,) = take("<i", "the dataset name length")
            if 0 < ln <= len(buf) - pos:
                meta["datasets"] = [bytes(take(f"<{ln}s", "the dataset name")[0])
                                    .decode("utf-8", "replace")]
    return out, meta


__all__ = ["imatrix_means", "read_imatrix", "write_imatrix"]
