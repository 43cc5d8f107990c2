"""A self-contained HTML report of a quantization: where the error is, and why.

Sections (PNG plots embedded as base64, matplotlib with the Agg backend):

1. summary: weight memory and perplexity before/after, recipe, layers per format;
2. per-layer error: relative weight error ``||Q(W) - W|| / ||W||`` and relative output error
   ``||x Q(W)^T - x W^T|| / ||x W^T||`` on calibration activations, for every quantized layer;
3. the outlier picture: per-channel max |X| of one layer's input before and after
   SmoothQuant's scaling (``alpha = 0.5``), the reason W8A8 needs it;
4. a weight histogram of one layer (in units of its scale) against the format's grid.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch
from torch import nn

from lowbit.export.base import quantized_modules, weight_qtensor


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def layer_errors(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[dict]:
    """Relative weight and output error of every quantized layer (inputs: name -> [T, in])."""
    rows = []
    with torch.no_grad():
        for name, m in quantized_modules(model):
            if not m.weight_quantizer.is_enabled:
                continue
            w = m.weight_2d().float()
            q = m.weight_2d(m.quantized_weight()).float()
            row = {"layer": name, "weight_err": float((q - w).norm() / w.norm().clamp_min(1e-30))}
            x = inputs.get(name)
            if x is not None:
                ref = x @ w.t()
                row["output_err"] = float((x @ q.t() - ref).norm() / ref.norm().clamp_min(1e-30))
            rows.append(row)
    return rows


def capture_layer_inputs(model: nn.Module, forward_loop, max_tokens: int = 1024,
                         names: list[str] | None = None) -> dict:
    """Inputs ``[tokens, in]`` of every quantized layer (or of ``names``) during
    ``forward_loop``, at most ``max_tokens`` rows each."""
    got: dict[str, list] = {}
    hooks = []
    mods = [(n, model.get_submodule(n)) for n in names] if names is not None else \
        list(quantized_modules(model))
    for name, m in mods:
        def hook(mod, a, name=name):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).float()
            have = sum(t.shape[0] for t in got.setdefault(name, []))
            if have < max_tokens:
                got[name].append(x[: max_tokens - have])
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items() if v}


@torch.no_grad()
def build_report(model: nn.Module, fp_inputs: dict[str, torch.Tensor], summary: dict,
                 title: str = "lowbit quantization report",
                 raw_inputs: dict[str, torch.Tensor] | None = None) -> str:
    """The HTML page (a string) for a quantized ``model``.

    ``fp_inputs``: full-precision inputs of the quantized layers (quantizers disabled, after
    any smoothing), see :func:`capture_layer_inputs`; ``raw_inputs``: the same layers' inputs
    in the original model (for the outlier picture; default ``fp_inputs``); ``summary``:
    key -> value rows for the summary table.
    """
    raw_inputs = raw_inputs if raw_inputs is not None else fp_inputs
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_errors(model, fp_inputs)
    figs = []
    if rows:
        fig, ax = plt.subplots(figsize=(11, 3.6))
        xs = range(len(rows))
        ax.plot(xs, [r["weight_err"] for r in rows], ".-", label="weight error")
        if all("output_err" in r for r in rows):
            ax.plot(xs, [r["output_err"] for r in rows], ".-", label="output error")
        ax.set_xlabel("quantized layer (model order)")
        ax.set_ylabel("relative error")
        ax.set_title("Per-layer relative error")
        ax.legend()
        ax.grid(alpha=0.3)
        figs.append(("Per-layer error", _png(fig),
                     "Relative error of each quantized layer's weight, and of its output on "
                     "calibration activations. Peaks are the layers to keep in higher precision."))
    # the outlier picture on the first layer that has captured inputs
    name = next((r["layer"] for r in rows if r["layer"] in raw_inputs), None)
    if name is not None:
        m = model.get_submodule(name)
        x = raw_inputs[name]
        xmax = x.abs().amax(0).clamp_min(1e-5)
        wmax = m.weight_2d().float().abs().amax(0).clamp_min(1e-5)
        s = (xmax.sqrt() / wmax.sqrt()).clamp_min(1e-5)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=False)
        axes[0].bar(range(xmax.numel()), xmax.numpy(), width=1.0)
        axes[0].set_title(f"max |X| per channel: {name}")
        axes[1].bar(range(xmax.numel()), (xmax / s).numpy(), width=1.0, color="tab:green")
        axes[1].set_title("after SmoothQuant scaling (alpha 0.5)")
        for a in axes:
            a.set_xlabel("input channel")
        figs.append(("Activation outliers", _png(fig),
                     f"A few channels carry much larger activations (max {float(xmax.max()):.3g}"
                     f" vs median {float(xmax.median()):.3g}); per-tensor activation "
                     "quantization spends its range on them. SmoothQuant moves that range "
                     "into the weights."))
        qt = weight_qtensor(m)
        if qt is not None:
            fmt = qt.element_format
            w = m.weight_2d().float()
            from lowbit.core import Layout

            lay = Layout(qt.spec, tuple(w.shape))
            sv = lay.from_natural(qt.scale)
            if qt.global_scale is not None:
                sv = sv * qt.global_scale
            units = lay.unview(lay.view(w) / sv).flatten()
            fig, ax = plt.subplots(figsize=(11, 3.2))
            ax.hist(units.clamp(fmt.min - 1, fmt.max + 1).numpy(), bins=200, color="tab:blue")
            for v in fmt.values().tolist():
                ax.axvline(v, color="tab:red", alpha=0.35, lw=0.8)
            ax.set_title(f"{name}: weights in units of their scale vs the {fmt.name} grid")
            ax.set_xlabel("w / scale")
            figs.append(("Weights against the grid", _png(fig),
                         f"Red lines: the {fmt.num_values} values of {fmt.name}. Every weight "
                         "is rounded to the nearest line."))
    esc = html.escape
    summary_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                           for k, v in summary.items())
    worst = sorted(rows, key=lambda r: -r.get("output_err", r["weight_err"]))[:10]
    worst_rows = "".join(
        f"<tr><td>{esc(r['layer'])}</td><td>{r['weight_err']:.4f}</td>"
        f"<td>{r.get('output_err', float('nan')):.4f}</td></tr>" for r in worst)
    sections = "".join(f"<h2>{esc(t)}</h2><p>{esc(d)}</p><img alt='{esc(t)}' "
                       f"src='data:image/png;base64,{b}'>" for t, b, d in figs)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{esc(title)}</h1>
<h2>Summary</h2><table>{summary_rows}</table>
<h2>Layers with the largest error</h2>
<table><tr><th>layer</th><th>weight error</th><th>output error</th></tr>{worst_rows}</table>
{sections}
</body></html>"""


def write_report(path: "str | Path", page: str) -> Path:
    """Write the page atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
