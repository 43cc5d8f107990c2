"""``lowbit formats``: the table of number formats (the "Figure 1" of the source texts)."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from lowbit import formats
from lowbit.cli import app, console
from lowbit.core.blocks import block_format_names, get_block_format


def _num(v: float) -> str:
    return f"{v:.6g}" if 1e-4 <= abs(v) < 1e6 or v == 0 else f"{v:.3e}"


def formats_table() -> Table:
    """A rich Table of every element, scale and block-scaled format."""
    t = Table(title="lowbit number formats")
    for col in ["format", "bits", "s.e.m", "bias", "max", "min normal", "min subnormal",
                "values", "Inf/NaN"]:
        t.add_column(col, justify="left" if col in ("format", "Inf/NaN") else "right")
    for name in formats.names():
        f = formats.get(name)
        if f.kind == "float":
            bias, specials = str(f.bias), {"none": "-/-", "ieee": "yes/yes", "fn": "-/yes"}[f.nan]
        else:
            bias, specials = "-", "-/-"
        t.add_row(name, str(f.bits), f.layout(), bias, _num(f.max), _num(f.min_normal),
                  _num(f.min_subnormal), str(f.num_values), specials)
    for name in block_format_names():
        bf = get_block_format(name)
        el = formats.get(bf.element)
        t.add_row(name, f"{bf.bits_per_value:g}", f"{el.layout()} x{bf.block_size}",
                  bf.scale_format + (" +fp32" if bf.global_scale else ""), _num(el.max),
                  _num(el.min_normal), _num(el.min_subnormal), str(el.num_values), "-/-")
    return t


@app.command("formats")
def formats_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON rows")) -> None:
    """Print every number format: bits, sign/exponent/mantissa, bias, range, distinct values."""
    if as_json:
        rows = [formats.get(n).as_dict() for n in formats.names()]
        console.print_json(json.dumps(rows))
        return
    console.print(formats_table())
    console.print("block formats: bits = average bits per value with the block scale; "
                  "nvfp4 adds one fp32 scale per tensor.")
