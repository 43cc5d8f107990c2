"""``lowbit recipes`` and ``lowbit demo``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lowbit.cli import app, console, fail
from lowbit.errors import LowbitError


@app.command("recipes")
def recipes_cmd() -> None:
    """List the preset recipes shipped with lowbit."""
    from lowbit import recipes

    t = Table(title="lowbit preset recipes")
    t.add_column("recipe", no_wrap=True)
    t.add_column("weights")
    t.add_column("activations")
    t.add_column("algorithms")
    t.add_column("description")
    for name in recipes.names():
        r = recipes.load(name)
        w = {tg.weight.short() for tg in r.targets if tg.weight is not None}
        a = {tg.input.short() for tg in r.targets if tg.input is not None}
        t.add_row(name, ", ".join(sorted(w)) or "-", ", ".join(sorted(a)) or "-",
                  ", ".join(s.name for s in r.algorithms) or "-", r.description)
    console.print(t)


@app.command("demo")
def demo_cmd(
    text: Optional[Path] = typer.Option(None, help="text file to measure perplexity on "
                                        "(default: docstrings of the Python standard library)"),
    recipe: str = typer.Option("int4-weight-only", help="recipe name or YAML file"),
    group_size: int = typer.Option(64, help="group size (the model's width 576 is not a "
                                   "multiple of 128)"),
    windows: int = typer.Option(8, help="evaluation windows of --seq-len tokens"),
    seq_len: int = typer.Option(512, help="evaluation context length"),
) -> None:
    """Quantize the real SmolLM2-135M model and show memory and perplexity before/after."""
    import torch

    import lowbit
    from lowbit.data import default_demo_text, load_model, read_text, tokenize
    from lowbit.eval import perplexity
    from lowbit.eval.footprint import weight_footprint

    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        body = read_text(text) if text is not None else default_demo_text()
        t0 = time.perf_counter()
        with console.status("loading SmolLM2-135M-Instruct (converted and cached on first use)"):
            model, tok = load_model()
        console.print(f"model loaded in {time.perf_counter() - t0:.1f} s")
        ids = tokenize(tok, body)
        need = windows * seq_len
        if ids.numel() < seq_len:
            fail(f"text has {ids.numel()} tokens; need at least {seq_len}")
        ids = ids[-need:] if ids.numel() >= need else ids
        before = weight_footprint(model)
        with console.status("perplexity before"):
            p0 = perplexity(model, ids, seq_len=seq_len, n_windows=windows)
        t1 = time.perf_counter()
        with console.status(f"quantizing with {recipe}"):
            lowbit.quantize(model, recipe, group_size=group_size)
        tq = time.perf_counter() - t1
        after = weight_footprint(model)
        with console.status("perplexity after"):
            p1 = perplexity(model, ids, seq_len=seq_len, n_windows=windows)
    except LowbitError as e:
        fail(str(e))
    t = Table(title=f"SmolLM2-135M, {recipe} (group {group_size}), "
                    f"{p0['windows']} windows x {seq_len} tokens")
    for c in ("", "weight memory (MB)", "bits/weight", "perplexity"):
        t.add_column(c, justify="right")
    t.add_row("FP32", f"{before['bytes'] / 1e6:.1f}", f"{before['bits_per_weight']:.2f}",
              f"{p0['ppl']:.2f}")
    t.add_row(recipe, f"{after['bytes'] / 1e6:.1f}", f"{after['bits_per_weight']:.2f}",
              f"{p1['ppl']:.2f}")
    console.print(t)
    console.print(f"quantized {len(model.lowbit_report.quantized)} layers in {tq:.1f} s; "
                  f"perplexity {100 * (p1['ppl'] / p0['ppl'] - 1):+.1f}%; weights "
                  f"{before['bytes'] / after['bytes']:.1f}x smaller")
    for note in model.lowbit_report.fallbacks[:3]:
        console.print(f"note: {note}")
