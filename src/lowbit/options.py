"""Keyword options checked by name: an option a function does not take is an error.

A misspelt option must never be dropped without a word (``float_type="q8"`` written as
``flaot_type`` would otherwise export float32). Functions that forward ``**options`` to
another one call :func:`reject_unknown` (or :func:`check_options`) first, so the user gets a
one-line :class:`~lowbit.errors.ConfigError` naming the option, where it went, the options
accepted there and the closest name.

This module imports nothing heavy (no torch), so any layer may use it.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterable, Mapping

from lowbit.errors import ConfigError


def accepted_options(fn: Callable, skip: Iterable[str] = ()) -> list[str]:
    """The keyword names ``fn`` takes (its named parameters, in order, without ``*args`` /
    ``**kwargs`` and without the names in ``skip``, e.g. the positional ``model``)."""
    skip = set(skip)
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]


def _named(name: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    return f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)


def unknown_option_message(names: Iterable[str], where: str, accepted: Iterable[str]) -> str:
    """``"<where>: unknown option 'flaot_type' (did you mean 'float_type'?); it takes: a, b"``
    (one line; every name of ``names``, each with the closest accepted name if any)."""
    accepted, names = list(accepted), sorted(names)
    s = "s" if len(names) > 1 else ""
    return (f"{where}: unknown option{s} {', '.join(_named(n, accepted) for n in names)}; "
            f"it takes: {', '.join(accepted) if accepted else '(no options)'}")


def reject_unknown(unknown: Mapping[str, Any], where: str, accepted: Iterable[str]) -> None:
    """Raise a one-line ConfigError naming the options of ``unknown`` (received through
    ``**kwargs`` but not taken); nothing when it is empty.

    ``where`` names the receiver (``"export format 'gguf'"``); ``accepted`` lists the names it
    does take; the closest one to each unknown name is suggested (difflib).
    """
    if unknown:
        raise ConfigError(unknown_option_message(unknown, where, accepted))


def check_options(options: Mapping[str, Any], where: str, accepted: Iterable[str]) -> None:
    """ConfigError (as :func:`reject_unknown`) if ``options`` has a name not in ``accepted``."""
    accepted = list(accepted)
    reject_unknown({k: v for k, v in options.items() if k not in accepted}, where, accepted)


__all__ = ["accepted_options", "check_options", "reject_unknown", "unknown_option_message"]
