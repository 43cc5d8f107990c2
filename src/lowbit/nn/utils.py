"""Finding, listing, enabling and disabling the quantizers of a model."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator

from torch import nn

from lowbit.config.recipe import match
from lowbit.nn.quantizer import TensorQuantizer


def quantizers(model: nn.Module, pattern: str | None = None):
    """``(name, TensorQuantizer)`` pairs of ``model`` (optionally matching ``pattern``)."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and (pattern is None or match(pattern, name)):
            yield name, m


@contextmanager
def disabled(qs: Iterable[TensorQuantizer]) -> Iterator[list[TensorQuantizer]]:
    """Disable the enabled quantizers among ``qs`` for the ``with`` body (full-precision
    weights/activations), then enable exactly those again, also on an exception."""
    qs = [q for q in qs if q.is_enabled]
    for q in qs:
        q.disable()
    try:
        yield qs
    finally:
        for q in qs:
            q.enable()


def disable_quantizers(model: nn.Module, pattern: str = "*") -> int:
    """Disable every quantizer whose name matches ``pattern``; returns how many."""
    n = 0
    for _, q in quantizers(model, pattern):
        if q.spec is not None:
            q.disable()
            n += 1
    return n


def enable_quantizers(model: nn.Module, pattern: str = "*") -> int:
    """Re-enable quantizers whose name matches ``pattern``; returns how many."""
    n = 0
    for _, q in quantizers(model, pattern):
        if q.spec is not None:
            q.enable()
            n += 1
    return n


def summary_rows(model: nn.Module) -> list[dict]:
    """One row per active quantizer: name, role, spec, mode, amax range, note."""
    rows = []
    for name, q in quantizers(model):
        if q.spec is None:
            continue
        amax = q.amax
        rows.append({
            "name": name, "role": q.role, "format": q.spec.format,
            "granularity": q.spec.short().split(" ", 1)[1] if " " in q.spec.short() else "",
            "dynamic": q.spec.dynamic, "mode": q.mode,
            "amax_min": None if amax is None else float(amax.min()),
            "amax_max": None if amax is None else float(amax.max()),
            "note": q.note,
        })
    return rows


def coverage_of(model: nn.Module):
    """The :class:`~lowbit.nn.coverage.Coverage` of ``model``: the one ``lowbit.quantize``
    recorded in ``model.lowbit_report``, else counted now from the model's quantized
    modules (with the recipe's reasons when ``model.lowbit_recipe`` is set)."""
    from lowbit.nn.coverage import weight_coverage

    report = getattr(model, "lowbit_report", None)
    cov = getattr(report, "coverage", None)
    if cov is not None:
        return cov
    return weight_coverage(model, getattr(model, "lowbit_recipe", None))


def print_summary(model: nn.Module, console=None, max_rows: int = 40) -> list[dict]:
    """Print every quantizer (format, granularity, amax range, enabled) with counts, then
    the coverage: the quantized share of all and of non-embedding weights (by element
    count), every unquantized weight parameter above 0.5% of the weights with the reason,
    and the unquantized elements summed by reason (see :mod:`lowbit.nn.coverage`).

    Returns the quantizer rows (see :func:`summary_rows`). Long lists are cut to
    ``max_rows`` lines; the counts always cover all quantizers and all weights.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = summary_rows(model)
    t = Table(title=f"lowbit quantizers ({len(rows)})")
    for c in ("quantizer", "format", "granularity", "mode", "amax range", "note"):
        t.add_column(c)
    for r in rows[:max_rows]:
        rng = "-" if r["amax_min"] is None else f"{r['amax_min']:.4g} .. {r['amax_max']:.4g}"
        t.add_row(r["name"], r["format"], r["granularity"], r["mode"], rng, r["note"])
    if len(rows) > max_rows:
        t.add_row(f"... {len(rows) - max_rows} more", "", "", "", "", "")
    console.print(t)
    counts = Counter((r["role"], r["format"], r["granularity"], r["mode"]) for r in rows)
    c = Table(title="counts")
    for col in ("role", "format", "granularity", "mode", "count"):
        c.add_column(col)
    for (role, fmt, g, mode), n in sorted(counts.items()):
        c.add_row(role, fmt, g, mode, str(n))
    console.print(c)
    _print_coverage(coverage_of(model), console, max_rows)
    return rows


def _print_coverage(cov, console, max_rows: int) -> None:
    from rich.table import Table

    console.print(cov.line(), highlight=False, soft_wrap=True)
    listed = cov.listed()
    if listed:
        t = Table(title="not quantized (each > 0.5% of the weights)")
        for col in ("parameter", "shape", "share", "kind", "why"):
            t.add_column(col, overflow="fold")
        for u in listed[:max_rows]:
            t.add_row(u.name, "x".join(map(str, u.shape)), f"{u.numel / cov.total:.1%}",
                      u.kind, u.reason)
        if len(listed) > max_rows:
            t.add_row(f"... {len(listed) - max_rows} more", "", "", "", "")
        console.print(t)
    kinds = cov.kinds()
    if kinds:
        t = Table(title="not quantized, by reason (all weights)")
        for col in ("kind", "why", "parameters", "elements", "share"):
            t.add_column(col, overflow="fold")
        for kind, reason, n, count in kinds:
            t.add_row(kind, reason, str(count), f"{n:,}", f"{n / cov.total:.1%}")
        console.print(t)
