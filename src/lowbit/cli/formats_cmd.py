"""``lowbit formats``: the table of number formats (the "Figure 1" of the source texts).

The rows come from :mod:`lowbit.formats.facts` (a snapshot of the format registries checked
by the tests), so the command starts without importing torch.
"""

from __future__ import annotations

import json

import typer
from rich.table import Table

from lowbit.cli import app, console
from lowbit.formats import facts

_SPECIALS = {"none": "-/-", "ieee": "yes/yes", "fn": "-/yes", None: "-/-"}
_JSON_KEYS = ("name", "bits", "layout", "max", "min_normal", "min_subnormal", "values")


def _num(v: float) -> str:
    return f"{v:.6g}" if 1e-4 <= abs(v) < 1e6 or v == 0 else f"{v:.3e}"


def formats_table() -> Table:
    """A rich Table of every element, scale and block-scaled format."""
    t = Table(title="lowbit number formats")
    for col in ["format", "bits", "s.e.m", "bias", "max", "min normal", "min subnormal",
                "values", "Inf/NaN"]:
        t.add_column(col, justify="left" if col in ("format", "Inf/NaN") else "right")
    elements = {f["name"]: f for f in facts.element_formats()}
    for f in elements.values():
        bias = "-" if f["bias"] is None else str(f["bias"])
        t.add_row(f["name"], str(f["bits"]), f["layout"], bias, _num(f["max"]),
                  _num(f["min_normal"]), _num(f["min_subnormal"]), str(f["values"]),
                  _SPECIALS[f["nan"]])
    for bf in facts.block_formats():
        el = elements[bf["element"]]
        t.add_row(bf["name"], f"{bf['bits_per_value']:g}", f"{el['layout']} x{bf['block_size']}",
                  bf["scale_format"] + (" +fp32" if bf["global_scale"] else ""),
                  _num(el["max"]), _num(el["min_normal"]), _num(el["min_subnormal"]),
                  str(el["values"]), "-/-")
    return t


@app.command("formats")
def formats_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON rows")) -> None:
    """Print every number format: bits, sign/exponent/mantissa, bias, range, distinct values."""
    if as_json:
        rows = [{k: f[k] for k in _JSON_KEYS} for f in facts.element_formats()]
        console.print_json(json.dumps(rows))
        return
    console.print(formats_table())
    console.print("block formats: bits = average bits per value with the block scale; "
                  "nvfp4 adds one fp32 scale per tensor.")
