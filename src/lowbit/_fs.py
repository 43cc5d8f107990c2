"""File-system helpers shared by every layer that writes files (no torch)."""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's file-mode creation mask (e.g. ``0o022``).

    Read from ``/proc/self/status`` where it is there (Linux), so the mask is never changed;
    elsewhere set and restored at once.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_umask(path: "str | os.PathLike", folder: bool = False) -> None:
    """Give ``path`` the mode ``open``/``mkdir`` would under the current umask: ``0o666 &
    ~umask`` for a file, ``0o777 & ~umask`` for a folder (``mkstemp``/``mkdtemp`` make
    0600/0700)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def cache_dir() -> Path:
    """The root of lowbit's cache: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``.

    Converted models live under ``<root>/models``, cached token ids under ``<root>/tokens``,
    compiled CPU helper kernels under ``<root>/native``.
    """
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"
