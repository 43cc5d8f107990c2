"""Which hardware paths ran, and which fell back: a record per process, and loud fallbacks.

A *path* is a fast implementation with a slower exact stand-in: ``training.fp8_scaled_mm``
(``torch._scaled_mm``, else the float32 emulation), ``runtime.<kernel>`` (a packed layer's
kernel, e.g. ``runtime.w8a8_int8`` with ``torch._int_mm`` or ``runtime.int4_weight_only``,
else the ``reference`` kernel), ``runtime.fused_linear`` (FastDecoder's fused q/k/v and
gate/up matmuls, else one call per layer). Code on such a path calls

* :func:`took_hardware` when the fast path ran;
* :func:`not_attempted` when it did not try it by design (no CUDA tensor, shapes the kernel
  does not take, the user switched it off): recorded, never warned about;
* :func:`fell_back` when it tried and the fast path failed: one ``warnings.warn`` per path
  per process (a :class:`HardwareFallbackWarning` with the error and the fallback taken),
  and the failure stays in the record.

:func:`hardware_path_report` returns ``{path: "hardware" | "fallback: <why>"}`` (a failure
outranks successes, which outrank fallbacks by design), so a test can assert that the
hardware path was taken. The record is per process; :func:`reset_hardware_paths` clears it
(and the warned-once memory). Imports nothing heavy (no torch).
"""

from __future__ import annotations

import warnings
from collections import Counter
from threading import Lock

#: path -> {"hardware" | "fallback: <why>": number of times}
_RECORD: dict[str, Counter] = {}
#: path -> the first "fallback: <what> (failed: <error>)" outcome
_FAILED: dict[str, str] = {}
_WARNED: set[str] = set()
_LOCK = Lock()


class HardwareFallbackWarning(RuntimeWarning):
    """A hardware path failed and lowbit took its exact but slower fallback."""


def _add(path: str, outcome: str) -> None:
    with _LOCK:
        _RECORD.setdefault(path, Counter())[outcome] += 1


def took_hardware(path: str) -> None:
    """Record that the fast (hardware) ``path`` ran."""
    _add(path, "hardware")


def not_attempted(path: str, why: str) -> None:
    """Record that ``path`` was not tried, by design (``why``, e.g. ``"inputs on cpu"``);
    no warning: this is the designed path there."""
    _add(path, f"fallback: {why}")


def fell_back(path: str, error: BaseException, fallback: str) -> None:
    """Record that ``path`` was tried and failed with ``error``, and that ``fallback`` (what
    runs instead) was taken; warn once per ``path`` per process."""
    err = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    outcome = f"fallback: {fallback} (failed: {err})"
    _add(path, outcome)
    with _LOCK:
        _FAILED.setdefault(path, outcome)
        first = path not in _WARNED
        _WARNED.add(path)
    if first:
        warnings.warn(f"lowbit: hardware path {path} failed ({err}); falling back to "
                      f"{fallback} (warned once per process; see "
                      "lowbit.hardware.hardware_path_report())", HardwareFallbackWarning,
                      stacklevel=3)


def hardware_path_report() -> dict[str, str]:
    """``{path: "hardware" | "fallback: <why>"}`` for every path met in this process.

    A path that failed at least once reads ``"fallback: <what ran> (failed: <error>)"``
    (its first failure); else ``"hardware"`` if the fast path ran at least once; else the
    (first) reason it was not attempted (``"fallback: inputs on cpu"``).
    """
    out = {}
    with _LOCK:
        for path, outcomes in _RECORD.items():
            if path in _FAILED:
                out[path] = _FAILED[path]
            elif outcomes.get("hardware"):
                out[path] = "hardware"
            else:
                out[path] = next(iter(outcomes))
    return out


def hardware_path_counts() -> dict[str, dict[str, int]]:
    """``{path: {outcome: times}}``: every outcome recorded, with how often (e.g. the layers
    of a model that got a kernel, or the GEMMs run)."""
    with _LOCK:
        return {p: dict(c) for p, c in _RECORD.items()}


def reset_hardware_paths() -> None:
    """Forget the record and which paths were warned about (tests; a new experiment)."""
    with _LOCK:
        _RECORD.clear()
        _FAILED.clear()
        _WARNED.clear()


__all__ = ["HardwareFallbackWarning", "fell_back", "hardware_path_counts",
           "hardware_path_report", "not_attempted", "reset_hardware_paths", "took_hardware"]
