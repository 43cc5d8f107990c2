"""Finding, listing, enabling and disabling the quantizers of a model."""

from __future__ import annotations

from collections import Counter

from torch import nn

from lowbit.config.recipe import match
from lowbit.nn.quantizer import TensorQuantizer


def quantizers(model: nn.Module, pattern: str | None = None):
    """``(name, TensorQuantizer)`` pairs of ``model`` (optionally matching ``pattern``)."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and (pattern is None or match(pattern, name)):
            yield name, m


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


def print_summary(model: nn.Module, console=None, max_rows: int = 40) -> list[dict]:
    """Print every quantizer (format, granularity, amax range, enabled) with counts.

    Returns the rows (see :func:`summary_rows`). Long lists are cut to ``max_rows`` lines;
    the counts always cover all quantizers.
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
    return rows
