"""The work folder of a streamed quantization, which makes it resumable.

Layout (default: ``.<out name>.partial`` next to the output folder)::

    manifest.json                    what the run is (fingerprint) and how far it got
    block-00000/                     finished block 0: model.safetensors + lowbit_checkpoint.json
    block-00001/ ...                 (native lowbit export of the block alone)
    inputs-00002-rank0.safetensors   the hidden states entering the next block, per rank
    rest/                            embeddings, final norm, head, config (at the end)

Every file is written to a temporary name and renamed into place, and the manifest is
updated (atomically, fsync'd) only after the block's files and every rank's next inputs
exist. After a crash (even ``kill -9``) the same call finds the manifest, checks that the
source, recipe, calibration data and options are the same (their fingerprint), re-captures
the embeddings' outputs (cheap) for the blocks' other arguments, loads the saved hidden
states and continues with the first unfinished block: the result is bit-identical to an
uninterrupted run. On success the output folder is assembled from the finished parts (hard
links, or copies) and the work folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowbit.errors import CheckpointError
from lowbit.pipeline.capture import Chunk
from lowbit.pipeline.distributed import LOCAL, Collective

FORMAT = "lowbit-stream"
VERSION = 1


def digest(obj: Any) -> str:
    """sha256 of calibration data: tensors (dtype, shape, bytes), lists, dicts, scalars."""
    h = hashlib.sha256()

    def feed(x):
        if torch.is_tensor(x):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"D")
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())
    feed(obj)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, fsync'd, renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkDir:
    """The resumable state of one streamed run (see the module doc).

    ``fingerprint``: a JSON-able dict naming the run (source files, recipe, calibration data
    digest, options, world size); a manifest with another fingerprint is a
    :class:`CheckpointError` unless ``resume=False`` (which starts over).
    """

    def __init__(self, path: "str | os.PathLike", fingerprint: dict, resume: bool = True,
                 comm: Collective | None = None):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        self.resume = resume
        self.comm = comm if comm is not None else LOCAL
        self.manifest: dict = {}

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    def start(self) -> int:
        """Open (or create) the folder; returns how many blocks are already done."""
        comm = self.comm
        if comm.is_main:
            if self.path.exists() and not self.resume:
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            if not self.manifest_file.is_file():
                write_json_atomic(self.manifest_file, {"format": FORMAT, "version": VERSION,
                                                       "fingerprint": self.fingerprint,
                                                       "done": 0, "blocks": []})
        comm.barrier()
        try:
            m = json.loads(self.manifest_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.manifest_file}: unreadable progress manifest ({e}); "
                                  "delete the folder to start over") from None
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CheckpointError(f"{self.manifest_file}: not a lowbit streaming manifest")
        if m.get("fingerprint") != self.fingerprint and int(m.get("done", 0)) == 0:
            comm.barrier()  # nothing finished: start over
            if comm.is_main:
                m = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                     "done": 0, "blocks": []}
                write_json_atomic(self.manifest_file, m)
            comm.barrier()
            m = json.loads(self.manifest_file.read_text())
        if m.get("fingerprint") != self.fingerprint:
            old = m.get("fingerprint") or {}
            diff = sorted(k for k in set(old) | set(self.fingerprint)
                          if old.get(k) != self.fingerprint.get(k))
            raise CheckpointError(
                f"{self.path} holds an unfinished run with other {', '.join(diff)}; pass "
                "resume=False to start over, or delete the folder")
        self.manifest = m
        done = int(m["done"])
        # inputs of blocks other than the next are leftovers of an interrupted step
        for f in self.path.glob(f"inputs-*-rank{comm.rank}.safetensors"):
            if f.name != self._inputs_name(done):
                f.unlink(missing_ok=True)
        return done

    @property
    def rows(self) -> list[dict]:
        """The report rows of the finished blocks."""
        return list(self.manifest.get("blocks", []))

    # --- blocks ------------------------------------------------------------------------------
    def block_dir(self, i: int) -> Path:
        """Folder of finished block ``i``."""
        return self.path / f"block-{i:05d}"

    def rest_dir(self) -> Path:
        """Folder of the tensors outside the blocks (and the config files)."""
        return self.path / "rest"

    def mark_done(self, i: int, row: dict) -> None:
        """Record block ``i`` (and every block before it) as finished (rank 0 writes)."""
        rows = [r for r in self.manifest.get("blocks", []) if r.get("index") != i]
        rows.append({**row, "index": i})
        self.manifest = {**self.manifest, "done": i + 1, "blocks": rows}
        if self.comm.is_main:
            write_json_atomic(self.manifest_file, self.manifest)

    # --- the hidden states between blocks ----------------------------------------------------
    def _inputs_name(self, i: int) -> str:
        return f"inputs-{i:05d}-rank{self.comm.rank}.safetensors"

    def save_inputs(self, i: int, chunks: list[Chunk]) -> None:
        """Save this rank's hidden states entering block ``i`` (``[b, seq, hidden]`` per
        chunk, as computed)."""
        f = self.path / self._inputs_name(i)
        tmp = f.with_name(f".{f.name}.tmp")
        save_file({f"chunk.{j}": c.hidden.detach().cpu().contiguous()
                   for j, c in enumerate(chunks)}, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, f)

    def load_inputs(self, i: int, chunks: list[Chunk]) -> None:
        """Replace the hidden states of ``chunks`` (in place) by those saved for block
        ``i``; their number, shapes and dtypes must match."""
        from lowbit.pipeline.source import SafetensorsSource

        f = self.path / self._inputs_name(i)
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the run cannot resume at block {i}; "
                                  "delete the folder to start over")
        src = SafetensorsSource(self.path, files=[f])
        if len(src.entries) != len(chunks):
            raise CheckpointError(f"{f}: {len(src.entries)} saved chunks, the calibration "
                                  f"data makes {len(chunks)}")
        for j, c in enumerate(chunks):
            h = src.read(f"chunk.{j}")
            if h.shape != c.hidden.shape or h.dtype != c.hidden.dtype:
                raise CheckpointError(f"{f}: chunk {j} is {h.dtype} {list(h.shape)}, expected "
                                      f"{c.hidden.dtype} {list(c.hidden.shape)}")
            chunks[j] = c.with_hidden(h.to(c.hidden.device))

    def drop_inputs(self, i: int) -> None:
        """Delete this rank's saved inputs of block ``i`` (once ``i`` is done)."""
        (self.path / self._inputs_name(i)).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the work folder (after the output is in place)."""
        if self.comm.is_main:
            shutil.rmtree(self.path, ignore_errors=True)


def kill_hook(stage: str, i: int) -> None:
    """Test hook: ``LOWBIT_TEST_KILL_AT=<stage>:<block>`` (stages ``exported``: block files
    written, manifest not yet; ``done``: manifest written) kills this process with SIGKILL
    there, to test resuming."""
    want = os.environ.get("LOWBIT_TEST_KILL_AT")
    if want and want == f"{stage}:{i}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
