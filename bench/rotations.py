"""Rotations (QuaRot / SpinQuant / MR-GPTQ) on the real model: rows with and without rotation.

SmolLM2-135M (``lowbit.data.load_model()``; FP32 = its Q4_1 GGUF dequantized). Every row is
scored on ``--windows`` held-out windows of austen (its last 20%) and as many of pydocs (its
last 20%: off-domain, unlike the calibration text), ``--seq-len`` tokens each, with
``lowbit.eval.perplexity``; calibration: ``--calib-samples`` seeded windows (seed 0) from the
first 80% of austen. Grouped integer specs get ``--group-size`` (64: the model's width 576 is
not a multiple of 128), as bench/ptq_quality.py and bench/algorithms.py pass it.

Each row runs in its own process, so its peak RSS (``resource.getrusage``) is that row's:
``quant_rss_mb`` up to the end of quantization, ``peak_rss_mb`` the whole process (load,
quantization, evaluation). A row that fails (a preset or step that does not exist yet, an
error while quantizing, a crash) is recorded with its error and the run goes on; the exit
status is 1 when a row failed.

Row names (``--rows a,b,c``; ``lowbit``, ``peers`` and ``all`` name the default sets):

- ``fp32``; a preset name (``nvfp4``, ``nvfp4-rotated``, ``kv-int4``, ...);
- a preset with steps added or removed: ``+step`` appends an algorithm step (``+step@k=v,k=v``
  with arguments), ``~step`` removes every step of that name: ``nvfp4+gptq`` (GPTQ without
  rotation), ``nvfp4+spinquant+gptq`` (learned rotations; model steps run before block steps),
  ``kv-int4~rotate`` (the same KV-cache spec without its R3 rotation);
- ``peer:llmc-<transform>-<quantizer>-<scheme>``: llm-compressor in its own venv
  (``--peer-python``, default ``$LOWBIT_PEER_PYTHON``; bench/peer_quant.py), which quantizes
  and evaluates the model itself on the very token windows of the lowbit rows (as
  bench/algorithms.py's peer-evaluated rows: its FP32 perplexity on them must match lowbit's
  within 0.1% or the row fails). Its wall time and peak RSS are the peer process's.

Writes ``--out`` (default bench/results/rotations.json) after every row; ``--append`` merges
into an existing file made with the same settings (rows of the same name are replaced), so the
benchmark can run in pieces. Prints a table.

    python bench/rotations.py [--rows lowbit] [--calib-samples 128] [--windows 32] [--append]
    python bench/rotations.py --rows peers --peer-python /work/cache/peers/llmc/bin/python --append
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
OUT = Path(__file__).parent / "results" / "rotations.json"
# "+gptq@token_weight=norm": GPTQ as the rotated presets run it, without their rotation
GPTQ = "+gptq@token_weight=norm"
LOWBIT_ROWS = ["fp32",
               # nvfp4-rotated is MR-GPTQ (block 16); QuaRot's R1/R2/R4 + GPTQ beside it
               "nvfp4", "nvfp4" + GPTQ, "nvfp4-rotated", "nvfp4+rotate" + GPTQ,
               "mxfp4", "mxfp4" + GPTQ, "mxfp4-rotated",
               "w4a8", "w4a8" + GPTQ, "w4a8-rotated",
               "int4-gptq", "int4-gptq-actorder", "int4-gptq-rotated",
               "kv-int4~rotate", "kv-int4",
               "int8-smoothquant", "int8-smoothquant-dynamic",
               # last: SpinQuant's training is the longest row (its defaults: 20 Cayley steps
               # of one 512-token row); shorten with e.g. nvfp4+spinquant@steps=5+gptq...
               "nvfp4+spinquant" + GPTQ]
PEER_ROWS = [f"peer:llmc-{t}-gptq-{s}" for s in ("nvfp4", "mxfp4", "w4a8", "w4a16")
             for t in ("none", "quip", "spinquant")] + ["peer:llmc-sq-gptq-w8a8"]
SETS = {"lowbit": LOWBIT_ROWS, "peers": PEER_ROWS, "all": LOWBIT_ROWS + PEER_ROWS}
# settings a merged file must share (--append)
SETTINGS = ("calib_samples", "seq_len", "windows", "group_size")
FP32_LABEL = "FP32 (dequantized Q4_1 GGUF)"


def parse_rows(text: str) -> list[str]:
    """``--rows`` (comma-separated names or set names ``lowbit``/``peers``/``all``) -> the
    row names in order, without repeats; a ``key=value`` piece after a row with ``@`` is one
    more step argument of that row (``a+spinquant@steps=2,samples=2,b`` is two rows). Empty:
    ValueError."""
    items: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if items and re.match(r"^\w+=", item) and "@" in items[-1]:
            items[-1] += "," + item  # a step argument: nvfp4+spinquant@steps=20,lr=1
        elif item:
            items.append(item)
    out: list[str] = []
    for item in items:
        for name in SETS.get(item, [item]):
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"--rows {text!r} names no row")
    return out


def parse_row(name: str) -> tuple[str, list[tuple[str, str, dict]]]:
    """A lowbit row name -> ``(preset, [(op, step, args)])`` with op ``"+"`` (append the step
    with ``args``) or ``"~"`` (remove the steps of that name). ``a+gptq@act_order=true~rotate``
    -> ``("a", [("+", "gptq", {"act_order": True}), ("~", "rotate", {})])``."""
    import yaml

    parts = re.split(r"([+~])", name)
    base, edits = parts[0], []
    if not base:
        raise ValueError(f"row {name!r}: no preset before its first + or ~")
    for op, seg in zip(parts[1::2], parts[2::2]):
        step, _, rest = seg.partition("@")
        if not step:
            raise ValueError(f"row {name!r}: an empty step name after {op!r}")
        args = {}
        for item in filter(None, rest.split(",")):
            k, eq, v = item.partition("=")
            if not eq or not k:
                raise ValueError(f"row {name!r}: step argument {item!r} is not key=value")
            args[k] = yaml.safe_load(v)
        if op == "~" and args:
            raise ValueError(f"row {name!r}: ~{step} removes a step and takes no arguments")
        edits.append((op, step, args))
    return base, edits


def build_recipe(name: str, group_size: int):
    """The lowbit Recipe of a row (see :func:`parse_row`), with ``group_size`` on grouped
    integer specs; returns ``(recipe, overrides)`` (``overrides`` may carry ``notes``: a step
    module imported because the built-ins do not load it). An unknown preset or a ``~step`` the preset
    lacks: ConfigError (the row fails with it)."""
    from lowbit import recipes
    from lowbit.errors import ConfigError

    from lowbit.pipeline.algorithms import algorithm_names

    base, edits = parse_row(name)
    d = recipes.load(base).to_dict()
    notes = []
    for op, step, _ in edits:
        if op == "+" and step not in algorithm_names():
            # a step whose module exists but is not among the built-ins yet (spinquant)
            import importlib.util

            if importlib.util.find_spec(f"lowbit.algorithms.{step}") is not None:
                importlib.import_module(f"lowbit.algorithms.{step}")
                notes.append(f"step {step} registered by importing lowbit.algorithms.{step} "
                             "(not loaded by lowbit.pipeline.algorithms._load_builtins)")
    algos = list(d.get("algorithms") or [])
    for op, step, args in edits:
        if op == "+":
            algos.append({"name": step, **({"args": args} if args else {})})
        else:
            if not any(a["name"] == step for a in algos):
                raise ConfigError(f"row {name}: preset {base} has no {step!r} step to remove "
                                  f"(its steps: {[a['name'] for a in algos] or 'none'})")
            algos = [a for a in algos if a["name"] != step]
    d["algorithms"] = algos
    if edits:
        d["name"] = name
    over = {"group_size": group_size} if recipes.takes_group_size(d) else {}
    if notes:
        over["notes"] = notes
    return recipes.load(d, **{k: v for k, v in over.items() if k != "notes"}), over


def load_algorithms_bench():
    """bench/algorithms.py as a module (its peer-evaluated rows: run_peer, peer_eval_row)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_algorithms",
                                                  Path(__file__).with_name("algorithms.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.DATA = DATA
    return mod


def peer_child(args, model, tok) -> dict:
    """A ``peer:`` row: bench/algorithms.py's peer_eval_row on this run's windows."""
    alg = load_algorithms_bench()
    ns = argparse.Namespace(child=args.child, peer_python=args.peer_python,
                            samples=args.calib_samples, seq_len=args.seq_len,
                            group_size=args.group_size, threads=args.threads,
                            eval_windows=args.windows, offdomain_windows=args.windows,
                            verbose=args.verbose)
    try:
        return alg.peer_eval_row(ns, model, tok, {"row": args.child})
    except alg.PeerMissing as e:
        raise RuntimeError(f"peer not available: {e}") from None


def child(args) -> dict:
    """One row in this process: load, quantize, evaluate both texts; returns the row."""
    import torch

    torch.set_num_threads(args.threads)
    import lowbit
    from lowbit.data import calibration_batches, forward_loop_from_batches, load_model, tokenize
    from lowbit.data.text import read_text, split_tokens
    from lowbit.eval import perplexity

    model, tok = load_model()
    if args.child.startswith("peer:"):
        return peer_child(args, model, tok)
    row = {"row": args.child}
    tq = 0.0
    if args.child != "fp32":
        recipe, over = build_recipe(args.child, args.group_size)
        calib = calibration_batches(tok, DATA / "austen_pp.txt", n_samples=args.calib_samples,
                                    seq_len=args.seq_len, seed=0, cache=True)
        loop = forward_loop_from_batches(calib)
        t = time.perf_counter()
        lowbit.quantize(model, recipe, forward_loop=loop)
        tq = time.perf_counter() - t
        row.update(over)
        row["recipe"] = recipe.to_dict()
        rep = getattr(model, "lowbit_report", None)
        rots = getattr(rep, "rotations", None) if rep is not None else None
        if rots:
            row["rotations"] = rots
    row["quant_s"] = round(tq, 1)
    row["quant_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    t = time.perf_counter()
    for key, fname in (("ppl", "austen_pp.txt"), ("offdomain_ppl", "pydocs_tut_ref.txt")):
        _, ev = split_tokens(tokenize(tok, read_text(DATA / fname), cache=True))
        row[key] = perplexity(model, ev, seq_len=args.seq_len, n_windows=args.windows)["ppl"]
    row["eval_s"] = round(time.perf_counter() - t, 1)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def merge(old: dict | None, meta: dict, rows: list[dict]) -> dict:
    """``{"meta", "rows"}`` of ``rows`` merged into ``old`` (a previous file, or None): rows
    of the same name are replaced in place, new ones appended; ``meta["runs"]`` lists every
    piece's argv. Settings (SETTINGS) that differ from ``old``'s: ValueError."""
    if old is None:
        return {"meta": {**meta, "runs": [meta["argv"]]}, "rows": rows}
    diff = [k for k in SETTINGS if old["meta"].get(k) != meta.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(f"--append: the existing file was made with {k}={old['meta'].get(k)}, "
                         f"this run has {k}={meta.get(k)}; use the same settings or another "
                         "--out")
    new = {r["row"]: r for r in rows}
    merged = [new.pop(r["row"], r) for r in old["rows"]] + list(new.values())
    runs = list(old["meta"].get("runs", [old["meta"].get("argv", [])])) + [meta["argv"]]
    return {"meta": {**old["meta"], **meta, "runs": runs}, "rows": merged}


def add_deltas(rows: list[dict]) -> None:
    """``delta_pct`` / ``offdomain_delta_pct`` (percent vs the ``fp32`` row) on every row with
    a perplexity, in place; nothing when there is no fp32 row."""
    base = next((r for r in rows if r["row"] == "fp32" and "ppl" in r), None)
    if base is None:
        return
    for r in rows:
        for k, dk in (("ppl", "delta_pct"), ("offdomain_ppl", "offdomain_delta_pct")):
            if r.get(k) is not None and base.get(k):
                r[dk] = round(100 * (r[k] / base[k] - 1), 3)


def table(data: dict) -> str:
    """The printed table of a results file."""
    m = data["meta"]
    lines = [f"SmolLM2-135M-Instruct ({FP32_LABEL}), {m['threads']} thread(s); calibration "
             f"{m['calib_samples']} x {m['seq_len']} (austen, first 80%, seed 0); ppl on "
             f"{m['windows']} windows x {m['seq_len']} of austen (last 20%) and pydocs "
             f"(last 20%, off-domain); int groups {m['group_size']}"]
    w = max([34] + [len(r["row"]) for r in data["rows"]])
    head = (f"{'row':{w}s} {'austen':>8s} {'vs FP32':>8s} {'pydocs':>8s} {'vs FP32':>8s} "
            f"{'quant s':>8s} {'RSS MB':>7s}")
    lines += [head, "-" * len(head)]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"{r['row']:{w}s} FAILED: {r['error'][:200]}")
            continue
        d = f"{r['delta_pct']:+7.2f}%" if "delta_pct" in r else ""
        od = f"{r['offdomain_delta_pct']:+7.2f}%" if "offdomain_delta_pct" in r else ""
        off = f"{r['offdomain_ppl']:8.2f}" if r.get("offdomain_ppl") is not None else ""
        lines.append(f"{r['row']:{w}s} {r['ppl']:8.2f} {d:>8s} {off:>8s} {od:>8s} "
                     f"{r['quant_s']:8.1f} {r['peak_rss_mb']:7d}")
    return "\n".join(lines)


def run_row(args, name: str) -> dict:
    """Run row ``name`` in a child process; its row, or ``{"row", "error"}`` on failure."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out)]
        for k in ("calib_samples", "seq_len", "windows", "group_size", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.peer_python:
            cmd += ["--peer-python", args.peer_python]
        if args.verbose:
            cmd.append("--verbose")
        t = time.perf_counter()
        p = subprocess.run(cmd)
        if not out.is_file():
            return {"row": name, "error": f"the row's process exited with {p.returncode} "
                    "without a result (killed? see its output above)"}
        row = json.loads(out.read_text())
    row["wall_s"] = round(time.perf_counter() - t, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="lowbit",
                    help="comma-separated row names, or lowbit / peers / all (default lowbit)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32,
                    help="held-out windows of each text (austen and pydocs)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--append", action="store_true",
                    help="merge into --out (same settings; rows of the same name replaced)")
    ap.add_argument("--peer-python", default=os.environ.get("LOWBIT_PEER_PYTHON"),
                    help="python of the llm-compressor venv for peer: rows "
                    "(default $LOWBIT_PEER_PYTHON)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k in ("calib_samples", "seq_len", "windows", "group_size", "threads"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.child:
        try:
            row = child(args)
        except Exception as e:  # the row fails, the run goes on
            traceback.print_exc()
            row = {"row": args.child, "error": f"{type(e).__name__}: {e}".strip()}
        args.child_out.write_text(json.dumps(row))
        return 0
    try:
        names = parse_rows(args.rows)
        for n in names:
            if not n.startswith("peer:"):
                parse_row(n)
    except ValueError as e:
        ap.error(str(e))
    import torch

    meta = {"model": "SmolLM2-135M-Instruct (FP32 from Q4_1 GGUF)",
            "calib_samples": args.calib_samples, "seq_len": args.seq_len,
            "windows": args.windows, "texts": {"ppl": "austen_pp.txt (last 20%)",
                                               "offdomain_ppl": "pydocs_tut_ref.txt (last 20%)"},
            "group_size": args.group_size, "threads": args.threads, "torch": torch.__version__,
            "argv": sys.argv[1:] if argv is None else list(argv)}
    old = None
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        try:
            merge(old, meta, [])  # refuse different settings before running anything
        except ValueError as e:
            ap.error(str(e))
    rows: list[dict] = []
    for name in names:
        print(f"== {name}", flush=True)
        row = run_row(args, name)
        rows.append(row)
        if "error" in row:
            print(f"{name}: FAILED: {row['error']}", flush=True)
        else:
            print(f"{name}: ppl {row['ppl']:.3f}, off-domain {row['offdomain_ppl']:.3f}, "
                  f"quantization {row['quant_s']:.0f} s, peak RSS {row['peak_rss_mb']} MB",
                  flush=True)
        data = merge(old, meta, rows)
        add_deltas(data["rows"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(args.out)
    print()
    print(table(data))
    print(f"wrote {args.out}")
    failed = [r["row"] for r in rows if "error" in r]
    if failed:
        print(f"FAILED rows (errors above and in the file): {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
