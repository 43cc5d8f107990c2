"""``lowbit recipes`` and ``lowbit demo``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lowbit.cli import app, console, fail, one_line_errors


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
        if r.gguf_mix is not None:  # planned per tensor at quantize time
            w.add(f"GGUF mix {r.gguf_mix.ftype.upper()}")
        a = {tg.input.short() for tg in r.targets if tg.input is not None}
        t.add_row(name, ", ".join(sorted(w)) or "-", ", ".join(sorted(a)) or "-",
                  ", ".join(s.name for s in r.algorithms) or "-", r.description)
    console.print(t)


DEMO_TEXT = "sample:austen_pp"  # packaged with lowbit (lowbit.data.sample_text)


def demo_text(text: str | None) -> tuple[str, str]:
    """``(body, label)`` of the text the demo scores: a packaged sample (``sample:NAME``, the
    default :data:`DEMO_TEXT`; label: the sample's title from :func:`lowbit.data.sample_info`)
    or a text file (label: its file name)."""
    from lowbit.data import SAMPLE_PREFIX, read_text, sample_info

    spec = DEMO_TEXT if text is None else text
    if spec.startswith(SAMPLE_PREFIX):
        return read_text(spec), sample_info(spec).title
    return read_text(Path(spec)), Path(spec).name


def demo_model_label() -> str:
    """What the demo's FP32 model is, read from the packaged file's name: ``"SmolLM2-135M-
    Instruct (FP32, dequantized from a 4-bit GGUF, Q4_1)"``."""
    from lowbit.data.models import GGUF_NAME

    name, qtype = Path(GGUF_NAME).stem.rsplit(".", 1)
    return f"{name} (FP32, dequantized from a 4-bit GGUF, {qtype})"


def demo_caption(model: str, text: str, windows: int, seq_len: int, all_tokens: bool) -> str:
    """The line above the demo's table: which model, which text and which part of it
    (``windows`` windows of ``seq_len`` tokens from the end of the text, or all of it)."""
    part = "all of it" if all_tokens else "its end"
    return (f"scored: {model} on {text} ({part}: {windows} windows x {seq_len} tokens)")


@app.command("demo")
def demo_cmd(
    text: Optional[str] = typer.Option(None, help="text file to measure perplexity on, or "
                                       f"sample:NAME (default: {DEMO_TEXT}, packaged)"),
    recipe: str = typer.Option("int4-weight-only", help="recipe name or YAML file"),
    group_size: Optional[int] = typer.Option(
        None, help="group size of a grouped recipe (default 64: the model's width 576 is not "
        "a multiple of 128)"),
    windows: int = typer.Option(8, help="evaluation windows of --seq-len tokens"),
    seq_len: int = typer.Option(512, help="evaluation context length"),
) -> None:
    """Quantize the real SmolLM2-135M model and show memory and perplexity before/after."""
    import torch

    import lowbit
    from lowbit.data import load_model, tokenize
    from lowbit.eval import perplexity
    from lowbit.eval.footprint import weight_footprint

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with one_line_errors("the demo"):
        body, label = demo_text(text)
        model_label = demo_model_label()
        t0 = time.perf_counter()
        with console.status("loading SmolLM2-135M-Instruct (converted and cached on first use)"):
            model, tok = load_model()
        console.print(f"model loaded in {time.perf_counter() - t0:.1f} s")
        ids = tokenize(tok, body)
        need = windows * seq_len
        if ids.numel() < seq_len:
            fail(f"text has {ids.numel()} tokens; need at least {seq_len}")
        all_tokens = ids.numel() <= need
        ids = ids if all_tokens else ids[-need:]
        before = weight_footprint(model)
        with console.status("perplexity before"):
            p0 = perplexity(model, ids, seq_len=seq_len, n_windows=windows)
        t1 = time.perf_counter()
        with console.status(f"quantizing with {recipe}"):
            from lowbit import recipes

            if group_size is None and recipes.takes_group_size(recipe):
                group_size = 64
            over = {} if group_size is None else {"group_size": group_size}
            lowbit.quantize(model, recipe, **over)
        tq = time.perf_counter() - t1
        after = weight_footprint(model)
        with console.status("perplexity after"):
            p1 = perplexity(model, ids, seq_len=seq_len, n_windows=windows)
    console.print(demo_caption(model_label, label, p0["windows"], seq_len, all_tokens),
                  highlight=False, markup=False)
    t = Table(title=f"{recipe}" + (f" (group {group_size})" if group_size else "") + " vs FP32")
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
    for line in model.lowbit_report.lines():
        console.print(f"note: {line}", highlight=False, soft_wrap=True)
