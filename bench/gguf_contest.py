"""The GGUF contest: lowbit's K-quant/IQ4 files against llama.cpp's own ``llama-quantize``.

On the reference model (SmolLM2-135M-Instruct, ``lowbit.data.load_model()``) and the text
``austen_pp.txt`` (tokenized whole with the model's tokenizer; first 80% of the tokens for
calibration, last 20% held out, as in ``bench/ptq_quality.py``):

1. the F32 GGUF written by lowbit (``lowbit.save(model, dir, format="gguf", tokenizer=tok)``),
   loaded and scored by ``llama-perplexity`` (this run also saves the F32 logits that every
   KL divergence below is measured against: ``--kl-divergence-base``);
2. ``llama-imatrix`` on the calibration text: the first ``calib_samples x 512`` calibration
   tokens, consecutive, written back as text (``--chunks calib_samples``, context 512); lowbit
   calibrates on exactly these token windows (``calib_data`` ``[calib_samples, 512]``);
3. per type (``q4_k_m q3_k_m q2_k iq4_xs q6_k``), methods
   ``llama`` (``llama-quantize F32 out TYPE``), ``llama-imatrix`` (the same with
   ``--imatrix``), ``lowbit`` (preset ``gguf-TYPE``: data-free importance),
   ``lowbit-imatrix`` (preset ``gguf-TYPE-imatrix``: importance from lowbit's calibration
   pass), ``lowbit-gptq`` (preset ``gguf-TYPE-gptq``), ``lowbit-awq`` (``gguf-TYPE-awq``),
   lowbit's written with
   ``lowbit.save(format="gguf")``;
4. every file scored by ``llama-perplexity --kl-divergence`` on the same held-out tokens
   (context 512, ``--chunks`` windows, the second half of each window scored, as llama.cpp
   does): perplexity, mean KL divergence to the F32 file and top-1 agreement ("Same top p").

Time: ``time s`` is the wall time to make the file from the F32 model: lowbit:
``lowbit.quantize`` (calibration included) plus ``lowbit.save`` (the exporter computes the ggml
fields and quantizes the embedding/output, so it is part of the quantization); llama:
``llama-quantize``, plus the ``llama-imatrix`` run for ``llama-imatrix``. Size is the file in
bytes; bits/weight counts every tensor of the file (norms included), as llama-quantize's BPW.

llama.cpp's tools come from the source inside the ``llama-cpp-python`` sdist (``--llama-bin``,
default ``$LOWBIT_LLAMA_BIN`` or ``../cache/llamacpp/.../build/bin`` next to the repository);
without them the llama rows are skipped with a note and lowbit's rows are only written and
sized. To build them (CMake; this CPU has AVX2 but no AVX-512: the AVX-512 flags of
docs/runtime.md make the tools die with SIGILL here, so build native, AMX off)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \\
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TOOLS=ON
    cmake --build build -j2 --target llama-quantize llama-imatrix llama-perplexity

Presets a lowbit method needs that the installed lowbit lacks are skipped rows with a note.
Results go to ``bench/results/gguf.json`` after every row (``--append`` keeps rows of other
type/method pairs measured with the same settings, so the bench can run in pieces).

    python bench/gguf_contest.py [--types q4_k_m q3_k_m] [--methods llama-imatrix lowbit-gptq]
        [--chunks 32] [--calib-samples 32] [--threads 2] [--work DIR] [--append] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder is sys.path[0] and this module would shadow the `gguf`
# package that lowbit's exporter and the size/type reader below import
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

ROOT = _HERE.parent
DATA = Path(os.environ.get("LOWBIT_DATA", ROOT.parent / "shared" / "data"))
DEFAULT_BIN = Path(os.environ.get("LOWBIT_LLAMA_BIN", ROOT.parent / "cache" / "llamacpp" /
                                  "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" /
                                  "bin"))
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# lowbit type name -> llama-quantize's ftype name
TYPES = {"q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K", "iq4_xs": "IQ4_XS",
         "q6_k": "Q6_K"}
# lowbit method -> preset name pattern
PRESETS = {"lowbit": "gguf-{t}", "lowbit-imatrix": "gguf-{t}-imatrix",
           "lowbit-gptq": "gguf-{t}-gptq", "lowbit-awq": "gguf-{t}-awq"}
METHODS = ("llama", "llama-imatrix", *PRESETS)
QUICK = {"types": ["q4_k_m", "q3_k_m"], "chunks": 4, "calib_samples": 8}
BUILD_NOTE = ("llama.cpp tools not found in {bin} (need " + ", ".join(TOOLS) + "): build them "
              "from the llama-cpp-python sdist with CMake, -DGGML_NATIVE=ON and AMX off (see "
              "the docstring of bench/gguf_contest.py; the AVX-512 flags of docs/runtime.md SIGILL on "
              "this AVX2-only CPU), then pass --llama-bin DIR")
SETTINGS = ("chunks", "calib_samples", "seq_len", "text")


class ToolError(RuntimeError):
    """A llama.cpp tool failed, timed out, or printed something this bench cannot parse."""


# ---------------------------------------------------------------- llama.cpp output parsing
def _num(pattern: str, out: str, what: str, tool: str) -> float:
    m = re.search(pattern, out)
    if m is None:
        raise ToolError(f"could not find {what} in the output of {tool} (pattern {pattern!r})")
    return float(m.group(1))


def parse_base_ppl(out: str) -> dict:
    """``{"ppl", "ppl_err", "chunks"}`` from ``llama-perplexity`` (plain or
    ``--kl-divergence-base``) output ``out`` (stdout and stderr together)."""
    t = "llama-perplexity"
    return {"ppl": _num(r"Final estimate: PPL = ([0-9.eE+-]+)", out, "the final PPL", t),
            "ppl_err": _num(r"Final estimate: PPL = [0-9.eE+-]+ \+/- ([0-9.eE+-]+)", out,
                            "the PPL uncertainty", t),
            "chunks": int(_num(r"over (\d+) chunks", out, "the number of chunks", t))}


def parse_kld(out: str) -> dict:
    """``{"ppl", "ppl_base", "kld", "kld_err", "kld_median", "kld_p99", "top1_pct", "chunks"}``
    from ``llama-perplexity --kl-divergence`` output (perplexities in nats-exp, KL in nats,
    top-1 agreement in percent of scored tokens)."""
    t = "llama-perplexity --kl-divergence"
    f = r"\s*([0-9.eE+-]+)"
    return {"ppl": _num(r"Mean PPL\(Q\)\s*:" + f, out, "Mean PPL(Q)", t),
            "ppl_base": _num(r"Mean PPL\(base\)\s*:" + f, out, "Mean PPL(base)", t),
            "kld": _num(r"Mean\s+KLD:" + f, out, "Mean KLD", t),
            "kld_err": _num(r"Mean\s+KLD:\s*[0-9.eE+-]+\s*±" + f, out, "the KLD uncertainty", t),
            "kld_median": _num(r"Median\s+KLD:" + f, out, "Median KLD", t),
            "kld_p99": _num(r"99\.0%\s+KLD:" + f, out, "99.0% KLD", t),
            "top1_pct": _num(r"Same top p:" + f, out, "Same top p", t),
            "chunks": int(_num(r"over (\d+) chunks", out, "the number of chunks", t))}


def parse_imatrix(out: str) -> dict:
    """``{"chunks"}``: how many chunks ``llama-imatrix`` computed over."""
    return {"chunks": int(_num(r"computing over (\d+) chunks", out, "the number of chunks",
                               "llama-imatrix"))}


def find_tools(bin_dir: "Path | None") -> "dict[str, Path] | None":
    """``{tool: path}`` for the three llama.cpp tools in ``bin_dir``; None when any is
    missing (or ``bin_dir`` is None)."""
    if bin_dir is None:
        return None
    found = {t: Path(bin_dir) / t for t in TOOLS}
    if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()):
        return found
    return None


def run_tool(cmd: list, log: Path, timeout: float) -> str:
    """Run ``cmd`` niced, stdout+stderr to ``log``; returns the output. Raises
    :class:`ToolError` naming the log on a non-zero exit or timeout."""
    cmd = ["nice", "-n", "19", *map(str, cmd)] if shutil.which("nice") else list(map(str, cmd))
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        log.write_text(out)
        raise ToolError(f"{Path(cmd[3] if cmd[0] == 'nice' else cmd[0]).name} timed out "
                        f"after {timeout:.0f} s (log {log})") from None
    log.write_text(p.stdout)
    if p.returncode != 0:
        tail = [ln for ln in p.stdout.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        name = Path(cmd[3] if cmd[0] == "nice" else cmd[0]).name
        raise ToolError(f"{name} exited with {p.returncode}: {tail[0][:200]} (log {log})")
    return p.stdout


def tool_version(path: Path) -> "str | None":
    """The first line of ``path --version`` (llama.cpp's version and commit), or None."""
    try:
        v = subprocess.run([str(path), "--version"], text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return (v.stdout.strip().splitlines() or [None])[0]


# ---------------------------------------------------------------- files
def gguf_stats(path: Path) -> dict:
    """``{"bytes", "bits_per_weight", "types"}`` of a GGUF file: file size in bytes, tensor
    bytes x 8 / tensor elements over every tensor, and ``{tensor name: ggml type name}``."""
    import gguf

    r = gguf.GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    nel = sum(int(t.n_elements) for t in r.tensors)
    return {"bytes": path.stat().st_size, "bits_per_weight": 8 * nbytes / max(nel, 1),
            "types": {t.name: t.tensor_type.name for t in r.tensors}}


def mix_diff(a: dict, b: dict) -> str:
    """A short line comparing two ``{tensor: type}`` maps (``a`` lowbit's, ``b`` llama's)."""
    diff = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    if not diff:
        return "same types"
    ex = ", ".join(f"{n}: {a.get(n)} vs {b.get(n)}" for n in diff[:3])
    return f"{len(diff)} tensors differ ({ex}{', ...' if len(diff) > 3 else ''})"


def one_gguf(folder: Path) -> Path:
    """The single ``.gguf`` file lowbit wrote into ``folder``."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise RuntimeError(f"expected one .gguf file in {folder}, found {len(files)}")
    return files[0]


# ---------------------------------------------------------------- rows
def row_key(r: dict) -> tuple:
    return (r["type"], r["method"])


def score_into(row: dict, path: Path, ctx: dict) -> None:
    """Size and (with the tools) KL/perplexity of ``path`` into ``row``."""
    st = gguf_stats(path)
    row.update(bytes=st["bytes"], size_mb=st["bytes"] / 1e6,
               bits_per_weight=st["bits_per_weight"])
    # lowbit's methods with calibration importance plan the mix as llama-quantize does
    # with --imatrix (gguf_mix.IMPORTANCE_STEPS): compare with that file's types
    key = (row["type"], row["method"] not in ("llama", "lowbit"))
    ref = ctx["llama_types"].get(key)
    if row["method"].startswith("lowbit") and ref is not None:
        row["mix_vs_llama"] = mix_diff(st["types"], ref)
    if row["method"].startswith("llama"):
        ctx["llama_types"][key] = st["types"]
    if ctx["tools"] is None:
        row["note"] = "not scored: no llama-perplexity"
        return
    a = ctx["args"]
    t0 = time.perf_counter()
    out = run_tool([ctx["tools"]["llama-perplexity"], "-m", path, "-c", a.seq_len,
                    "-t", a.threads, "--chunks", a.chunks, "--kl-divergence-base",
                    ctx["base_kld"], "--kl-divergence"],
                   ctx["work"] / f"ppl-{row['type']}-{row['method']}.log", a.timeout)
    k = parse_kld(out)
    row.update(ppl=k["ppl"], delta_ppl_pct=100 * (k["ppl"] / ctx["f32_ppl"] - 1),
               kld=k["kld"], kld_err=k["kld_err"], kld_median=k["kld_median"],
               kld_p99=k["kld_p99"], top1_pct=k["top1_pct"], eval_chunks=k["chunks"],
               eval_s=time.perf_counter() - t0)


def llama_row(typ: str, method: str, ctx: dict) -> dict:
    """Quantize the F32 file with llama-quantize (``--imatrix`` for ``llama-imatrix``)."""
    row = {"type": typ, "method": method}
    if ctx["tools"] is None:
        row["skipped"] = BUILD_NOTE.format(bin=ctx["args"].llama_bin)
        return row
    if method == "llama-imatrix" and ctx.get("imatrix") is None:
        row["skipped"] = f"no imatrix: {ctx.get('imatrix_error', 'llama-imatrix did not run')}"
        return row
    out = ctx["work"] / f"llama-{typ}{'-imatrix' if method != 'llama' else ''}.gguf"
    cmd = [ctx["tools"]["llama-quantize"]]
    if method == "llama-imatrix":
        cmd += ["--imatrix", ctx["imatrix"]]
    cmd += [ctx["f32"], out, TYPES[typ], ctx["args"].threads]
    t0 = time.perf_counter()
    run_tool(cmd, ctx["work"] / f"quantize-{typ}-{method}.log", ctx["args"].timeout)
    row["quant_s"] = time.perf_counter() - t0
    row["calib_s"] = ctx["imatrix_s"] if method == "llama-imatrix" else 0.0
    row["time_s"] = row["quant_s"] + row["calib_s"]
    score_into(row, out, ctx)
    if not ctx["args"].keep_files:
        out.unlink()
    return row


def lowbit_row(typ: str, method: str, ctx: dict) -> dict:
    """Quantize a copy of the model with the preset of ``method`` and write it as GGUF."""
    import lowbit
    from lowbit import recipes

    row = {"type": typ, "method": method, "preset": PRESETS[method].format(t=typ)}
    if row["preset"] not in recipes.names():
        row["skipped"] = (f"preset {row['preset']} is not in lowbit.recipes.names() (the "
                          "issue-19 presets/steps it needs are not there yet)")
        return row
    m = copy.deepcopy(ctx["model"])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(m, row["preset"], calib_data=ctx["calib"])
    row["quant_s"] = time.perf_counter() - t0
    row["calib_s"] = 0.0
    folder = ctx["work"] / f"lowbit-{typ}-{method}"
    t0 = time.perf_counter()
    lowbit.save(m, folder, format="gguf", tokenizer=ctx["tok"], overwrite=True)
    row["export_s"] = time.perf_counter() - t0
    row["time_s"] = row["quant_s"] + row["export_s"]  # the exporter computes ggml fields too
    del m
    score_into(row, one_gguf(folder), ctx)
    if not ctx["args"].keep_files:
        shutil.rmtree(folder)
    return row


def llama_types(typ: str, ctx: dict, imatrix: bool = False) -> "dict | None":
    """llama-quantize's ``{tensor: type}`` for ``typ`` (with ``--imatrix`` when ``imatrix``:
    its rules differ, e.g. IQ4_XS's first ffn_down layers), for the mix comparison;
    quantizes once when no llama row of this run made that file."""
    key = (typ, imatrix)
    if key not in ctx["llama_types"] and ctx["tools"] is not None:
        if imatrix and ctx.get("imatrix") is None:
            return None
        out = ctx["work"] / f"mix-{typ}{'-imatrix' if imatrix else ''}.gguf"
        cmd = [ctx["tools"]["llama-quantize"]]
        if imatrix:
            cmd += ["--imatrix", ctx["imatrix"]]
        try:
            run_tool(cmd + [ctx["f32"], out, TYPES[typ], ctx["args"].threads],
                     ctx["work"] / f"mix-{typ}.log", ctx["args"].timeout)
            ctx["llama_types"][key] = gguf_stats(out)["types"]
        except ToolError:
            ctx["llama_types"][key] = None
        out.unlink(missing_ok=True)
    return ctx["llama_types"].get(key)


# ---------------------------------------------------------------- report
def fmt(v, spec: str, width: int) -> str:
    """``v`` formatted with ``spec`` (which holds ``width``), or a right-aligned dash."""
    return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)


def table(rows: list, meta: dict) -> str:
    """The table of ``rows`` (F32 first, then type x method) as text."""
    head = (f"{'type':8s} {'method':15s} {'size MB':>8s} {'bits/w':>7s} {'PPL':>8s} "
            f"{'dPPL%':>7s} {'mean KL':>9s} {'top1 %':>7s} {'time s':>7s}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        note = r.get("skipped") or r.get("error") or r.get("note") or r.get("mix_vs_llama", "")
        lines.append(
            f"{r['type']:8s} {r['method']:15s} {fmt(r.get('size_mb'), '8.1f', 8)} "
            f"{fmt(r.get('bits_per_weight'), '7.3f', 7)} {fmt(r.get('ppl'), '8.3f', 8)} "
            f"{fmt(r.get('delta_ppl_pct'), '+7.2f', 7)} {fmt(r.get('kld'), '9.5f', 9)} "
            f"{fmt(r.get('top1_pct'), '7.2f', 7)} {fmt(r.get('time_s'), '7.1f', 7)}  {note}")
    return "\n".join(lines)


def verdicts(rows: list) -> list:
    """One line per type and lowbit method: against llama-quantize with imatrix, the size
    ratio, KL ratio and PPLs, and whether the issue's goal (no larger, lower KL and PPL)
    holds; plus lowbit's best Q3_K_M against llama's Q4_K_M with imatrix."""
    by = {row_key(r): r for r in rows if r.get("kld") is not None}
    out = []
    for typ in TYPES:
        ref = by.get((typ, "llama-imatrix"))
        for method in PRESETS:
            r = by.get((typ, method))
            if r is None or ref is None:
                continue
            goal = (r["bytes"] <= ref["bytes"] and r["kld"] < ref["kld"] and
                    r["ppl"] < ref["ppl"])
            label = {"lowbit": "rtn"}.get(method, method.removeprefix("lowbit-"))
            out.append(f"{typ}: lowbit {label} vs llama-quantize+imatrix: size "
                       f"{r['bytes'] / ref['bytes']:.3f}x, "
                       f"KL {r['kld'] / ref['kld']:.3f}x ({r['kld']:.5f} vs {ref['kld']:.5f}), "
                       f"PPL {r['ppl']:.3f} vs {ref['ppl']:.3f} -> "
                       f"{'goal met' if goal else 'goal NOT met'}")
    q3 = [by[("q3_k_m", m)] for m in PRESETS if ("q3_k_m", m) in by]
    ref = by.get(("q4_k_m", "llama-imatrix"))
    if q3 and ref is not None:
        best = min(q3, key=lambda r: r["kld"])
        out.append(f"best lowbit q3_k_m ({best['method']}) vs llama q4_k_m+imatrix: size "
                   f"{best['bytes'] / ref['bytes']:.3f}x, KL {best['kld']:.5f} vs "
                   f"{ref['kld']:.5f}, PPL {best['ppl']:.3f} vs {ref['ppl']:.3f}")
    return out


def write_json(path: Path, meta: dict, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "verdicts": verdicts(rows)},
                              indent=2))
    tmp.replace(path)


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    """The command line; unknown types/methods are argparse errors (exit 2)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", choices=list(TYPES), default=None)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--chunks", type=int, default=None,
                    help="held-out windows of --seq-len scored by llama-perplexity (32)")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="calibration windows of --seq-len, lowbit's and llama-imatrix's (32)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per llama.cpp call")
    ap.add_argument("--text", type=Path, default=DATA / "austen_pp.txt")
    ap.add_argument("--llama-bin", type=Path, default=DEFAULT_BIN)
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the files (default: a temporary one, removed at the end)")
    ap.add_argument("--keep-files", action="store_true", help="keep every quantized GGUF")
    ap.add_argument("--quick", action="store_true",
                    help="tiny run: types q4_k_m q3_k_m, 4 chunks, 8 calibration windows")
    ap.add_argument("--append", action="store_true",
                    help="keep rows of other type/method pairs already in --out (same settings)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf.json")
    a = ap.parse_args(argv)
    q = QUICK if a.quick else {"types": list(TYPES), "chunks": 32, "calib_samples": 32}
    a.types = a.types or q["types"]
    a.chunks = q["chunks"] if a.chunks is None else a.chunks
    a.calib_samples = q["calib_samples"] if a.calib_samples is None else a.calib_samples
    for k in ("chunks", "calib_samples", "seq_len", "threads"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(a, k)}")
    if a.seq_len % 2:
        ap.error(f"--seq-len must be even (llama-perplexity scores the second half), got "
                 f"{a.seq_len}")
    return a


def prepare(a, work: Path) -> dict:
    """Model, tokenizer, calibration windows, the text files and the F32 GGUF."""
    import torch

    import lowbit
    from lowbit.data import load_model, tokenize
    from lowbit.data.text import read_text, split_tokens

    torch.set_num_threads(a.threads)
    model, tok = load_model()
    ids = tokenize(tok, read_text(a.text))
    calib_ids, eval_ids = split_tokens(ids, 0.8)
    n = a.calib_samples * a.seq_len
    if calib_ids.numel() < n:
        raise SystemExit(f"--calib-samples {a.calib_samples} x {a.seq_len} needs {n} tokens, "
                         f"the calibration part has {calib_ids.numel()}")
    if eval_ids.numel() < (a.chunks + 1) * a.seq_len:  # +1: llama.cpp may tokenize shorter
        raise SystemExit(f"--chunks {a.chunks} x {a.seq_len} needs more held-out tokens than "
                         f"the {eval_ids.numel()} there are")
    # lowbit calibrates on these consecutive windows; llama-imatrix gets their text (plus half
    # a window, so a tokenization a few tokens shorter still fills --chunks windows)
    calib = calib_ids[:n].reshape(a.calib_samples, a.seq_len)
    dec = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    (work / "calib.txt").write_text(tok.decode(calib_ids[:n + a.seq_len // 2].tolist(), **dec))
    (work / "eval.txt").write_text(tok.decode(eval_ids.tolist(), **dec))
    f32_dir = work / "f32"
    if not (f32_dir / "model.gguf").exists():
        lowbit.save(model, f32_dir, format="gguf", tokenizer=tok, overwrite=True)
    return {"model": model, "tok": tok, "calib": calib, "f32": one_gguf(f32_dir),
            "calib_tokens": calib_ids.numel(), "eval_tokens": eval_ids.numel()}


def main(argv=None) -> None:
    a = parse_args(argv)
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-gguf-bench-")
        work = Path(tmp.name)
    else:
        work = a.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        run(a, work)
    finally:
        if tmp is not None:
            tmp.cleanup()


def f32_and_imatrix(a, ctx: dict, f32_row: dict) -> None:
    """Score the F32 file (saving the KL base logits) and run llama-imatrix; a stamp in the
    work folder lets a later run with the same settings reuse both."""
    work, tools = ctx["work"], ctx["tools"]
    stamp_path = work / "stamp.json"
    want = {k: str(getattr(a, k)) for k in SETTINGS}
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    if stamp.get("settings") != want:
        stamp = {"settings": want}
    ctx["base_kld"] = work / "f32.kld"
    if "f32" in stamp and ctx["base_kld"].exists():
        f32_row.update(stamp["f32"])
    else:
        t0 = time.perf_counter()
        out = run_tool([tools["llama-perplexity"], "-m", ctx["f32"], "-f", work / "eval.txt",
                        "-c", a.seq_len, "-t", a.threads, "--chunks", a.chunks,
                        "--kl-divergence-base", ctx["base_kld"]], work / "ppl-f32.log",
                       a.timeout)
        p = parse_base_ppl(out)
        if p["chunks"] != a.chunks:
            raise ToolError(f"llama-perplexity scored {p['chunks']} chunks of the held-out "
                            f"text, expected --chunks {a.chunks}")
        stamp["f32"] = {"ppl": p["ppl"], "ppl_err": p["ppl_err"], "eval_chunks": p["chunks"],
                        "kld": 0.0, "top1_pct": 100.0, "delta_ppl_pct": 0.0,
                        "eval_s": time.perf_counter() - t0}
        f32_row.update(stamp["f32"])
        stamp.pop("imatrix", None)
        stamp_path.write_text(json.dumps(stamp))
    ctx["f32_ppl"] = f32_row["ppl"]
    if all(m in ("llama", "lowbit") for m in a.methods):
        return  # the imatrix is for llama-imatrix rows and the mix comparison of lowbit's
        # importance methods (llama-quantize --imatrix's tensor types)
    im = work / "imatrix.gguf"
    if "imatrix" in stamp and im.exists():
        ctx["imatrix"], ctx["imatrix_s"] = im, stamp["imatrix"]["imatrix_s"]
        return
    try:
        t0 = time.perf_counter()
        out = run_tool([tools["llama-imatrix"], "-m", ctx["f32"], "-f", work / "calib.txt",
                        "-c", a.seq_len, "-t", a.threads, "--chunks", a.calib_samples,
                        "--no-ppl", "-o", im], work / "imatrix.log", a.timeout)
        dt = time.perf_counter() - t0
        n = parse_imatrix(out)["chunks"]
        if n != a.calib_samples:
            raise ToolError(f"llama-imatrix computed over {n} chunks, expected "
                            f"--calib-samples {a.calib_samples}")
        if not im.exists():
            raise ToolError(f"llama-imatrix exited 0 but wrote no {im}")
    except ToolError as e:
        ctx["imatrix_error"] = str(e)
        print(f"llama-imatrix: {e}", flush=True)
        return
    ctx["imatrix"], ctx["imatrix_s"] = im, dt
    stamp["imatrix"] = {"imatrix_s": dt, "chunks": n}
    stamp_path.write_text(json.dumps(stamp))
    print(f"llama-imatrix: {n} chunks x {a.seq_len} in {dt:.1f} s", flush=True)


def run(a, work: Path) -> None:
    """The whole bench in ``work``; prints the table and writes ``a.out``."""
    tools = find_tools(a.llama_bin)
    if tools is None:
        print(BUILD_NOTE.format(bin=a.llama_bin), flush=True)
    ctx = {"args": a, "work": work, "tools": tools, "llama_types": {}, "imatrix_s": 0.0}
    t_start = time.perf_counter()
    ctx.update(prepare(a, work))
    meta = {"model": "SmolLM2-135M-Instruct (lowbit.data.load_model; FP32 from its Q4_1 GGUF)",
            "text": a.text.name, "calib_tokens_available": ctx["calib_tokens"],
            "eval_tokens_available": ctx["eval_tokens"], "seq_len": a.seq_len,
            "chunks": a.chunks, "calib_samples": a.calib_samples, "threads": a.threads,
            "calibration": f"the first {a.calib_samples} x {a.seq_len} tokens of the first 80% "
                           "(consecutive windows), lowbit's calib_data and llama-imatrix's "
                           "text (--chunks)",
            "evaluation": f"llama-perplexity -c {a.seq_len} --chunks {a.chunks} on the last 20%"
                          ", KL divergence vs the F32 GGUF; second half of each window scored",
            "time": "time_s: wall time F32 model -> file: lowbit.quantize (incl. calibration)"
                    " + lowbit.save, or llama-quantize (+ llama-imatrix for llama-imatrix)",
            "llama_bin": str(a.llama_bin) if tools else None, "argv": sys.argv[1:]}
    rows: list = []
    if a.append and a.out.exists():
        old = json.loads(a.out.read_text())
        if any(old["meta"].get(k) != meta.get(k) for k in ("chunks", "calib_samples",
                                                           "seq_len", "text")):
            raise SystemExit(f"--append: {a.out} was measured with other settings "
                             f"(chunks/calib_samples/seq_len/text); drop --append or match them")
        rows = [r for r in old["rows"] if r["type"] != "f32"]
    f32_row = {"type": "f32", "method": "lowbit-export", "time_s": 0.0}
    score_into(f32_row, ctx["f32"], {**ctx, "tools": None})
    f32_row.pop("note", None)
    if tools is not None:
        try:
            f32_and_imatrix(a, ctx, f32_row)
            meta["llama_cpp_version"] = tool_version(tools["llama-perplexity"])
            print(f"F32: llama.cpp loads it, PPL {f32_row['ppl']:.4f} over {a.chunks} x "
                  f"{a.seq_len}", flush=True)
        except ToolError as e:
            f32_row["error"] = f"llama.cpp could not score the F32 file: {e}"
            print(f32_row["error"], flush=True)
            ctx["tools"] = tools = None
    else:
        f32_row["note"] = "not scored: no llama-perplexity"
    new = [(t, m) for t in a.types for m in METHODS if m in a.methods]
    rows = [f32_row] + [r for r in rows if row_key(r) not in set(new)]
    for typ, method in new:
        t0 = time.perf_counter()
        try:
            if method.startswith("llama"):
                row = llama_row(typ, method, ctx)
            else:
                llama_types(typ, ctx, method != "lowbit")
                row = lowbit_row(typ, method, ctx)
        except Exception as e:  # noqa: BLE001 - a failure is a row, never the end of the bench
            row = {"type": typ, "method": method,
                   "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        status = row.get("skipped") or row.get("error") or (
            f"PPL {row['ppl']:.3f}, KL {row['kld']:.5f}, {row['size_mb']:.1f} MB"
            if row.get("kld") is not None else row.get("note", ""))
        print(f"{typ} {method}: {status} ({row['wall_s']:.0f} s)", flush=True)
        write_json(a.out, meta, rows)
    order = {t: i for i, t in enumerate(["f32", *TYPES])}
    rows.sort(key=lambda r: (order.get(r["type"], 99), METHODS.index(r["method"])
                             if r["method"] in METHODS else -1))
    meta["wall_s"] = time.perf_counter() - t_start
    write_json(a.out, meta, rows)
    print()
    print(f"SmolLM2-135M-Instruct GGUF, {a.text.name}: llama-perplexity {a.chunks} x "
          f"{a.seq_len} held-out tokens (KL vs F32), calibration {a.calib_samples} x "
          f"{a.seq_len} tokens for llama-imatrix and lowbit")
    print(table(rows, meta))
    for line in verdicts(rows):
        print(line)
    print(f"wrote {a.out} ({meta['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
