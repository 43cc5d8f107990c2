"""Real low-bit inference on the real model: memory, prefill and decode speed per variant.

SmolLM2-135M (``lowbit.data.load_model``), threads = cores (``--threads``) for the prompt,
``--decode-threads`` (default: the same) for generation, as llama.cpp's ``n_threads_batch``
and ``n_threads`` (on a 2-core machine one decode thread can be the faster choice: a
token's matrix-vector products are too small to pay for a second thread's sync). Per variant:
resident weight memory (MB, parameters and buffers, tied ones once) and its ratio to the
packed size (:func:`lowbit.runtime.memory_report`: codes + scales as quantized; goal within
5%), prefill time of a 512-token prompt (median of ``--repeats``; logits of the last token
only, as ``generate`` and llama.cpp compute them), decode speed (tokens/s, batch 1, greedy,
``--new-tokens`` tokens after a 32-token prompt, prompt included in the time, as
``generate`` runs it) three times: with transformers' ``generate``, with lowbit's own loop
(:class:`lowbit.runtime.FastDecoder`: fused q/k/v and gate/up, static KV cache; its greedy
tokens are checked against ``generate``'s and its extra bytes counted), and with that loop's
step captured by ``torch.compile`` (``FastDecoder(compile=True)``; its first generate, which
builds the C++, is reported as ``first_s``; ``--no-compile`` skips it); then decode
throughput at batch sizes ``--batch`` (default 4 and 16: tokens/s in all, ``generate`` on
distinct prompts of the same length; llama.cpp's batched decode is not run). The goals are
printed per loop: int4 weight-only decode over FP32 (2x), BF16 (1.3x) and llama.cpp Q4_0
(1.0x), int8 weight-only over llama.cpp Q8_0 (1.0x), W8A8 over FP32 (1.3x), and int4
prefill time over BF16's (<= 1.2x).

Variants (``--variants`` picks some):

* ``fp32``, ``bf16``: the float model (SmolLM2-135M-Instruct's Q4_1 GGUF dequantized, in
  float32 / bfloat16);
* ``int8 wo``, ``int4 wo g64``: weight-only kernels (torch's int8 / int4 packed-weight CPU
  kernels, bfloat16 activations); quantized from the FP32 model, converted, then the rest of
  the model (embedding = tied LM head, norms) cast to bfloat16, as the llama.cpp rows;
* ``int4 wo g64 + int8 head``: the same, with the tied LM head untied and quantized to int8
  per channel (the embedding table stays bf16: 28 MB more resident, half the head's bytes
  read per token);
* ``int4 wo g64 fp32``: the same int4 layers in an FP32 model (activations cast per layer);
* ``w8a8 int8``: dynamic per-token int8 activations (FP32 model): ``torch._int_mm`` for
  the prompt, the int8 GEMV on integer-valued bf16 activations for decode rows
  (:class:`lowbit.runtime.kernels.W8A8Int8`);
* ``int4 g64 reference``: the reference dequantize-then-matmul path (FP32 model);
* ``llama.cpp Q8_0``, ``llama.cpp Q4_0``: the model quantized with the presets
  ``gguf-q8_0`` / ``gguf-q4_0``, exported by ``lowbit.save(..., format="gguf")`` with float
  tensors in ``--gguf-float-type`` (bf16), run by ``llama_cpp`` (n_threads_batch = threads,
  n_threads = decode threads, n_batch 512), in a child process (a crash of the native
  library is a note); weights MB is the GGUF file size. On this VM llama.cpp's AMX path
  segfaults: build llama-cpp-python without it (docs/runtime.md);
* ``torchao int8 wo``: only when ``torchao`` is importable (else a note).

Then the goal ratios, and, with CUDA only, a GPU section (run once, on an H200:
``bench/results/runtime_gpu_h200.json``; the CPU results were taken with ``--no-gpu``): FP8 ``_scaled_mm`` linear vs BF16 at
4096x4096x4096 and int4 weight-only GEMV (M=1) vs BF16. Prints tables and writes
``bench/results/runtime.json``.

    python bench/runtime.py [--new-tokens 128] [--prefill 512] [--repeats 3] [--variants ...]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
import lowbit.runtime as rt
from lowbit.data import load_model

VARIANTS = ["fp32", "bf16", "int8 wo", "int4 wo g64", "int4 wo g64 + int8 head",
            "int4 wo g64 fp32", "w8a8 int8",
            "int4 g64 reference", "llama.cpp Q8_0", "llama.cpp Q4_0", "torchao int8 wo"]
#: (variant, over, what, goal): decode tok/s ratios (>= goal) per loop, prefill time ratios
#: (<= goal); llama.cpp rows are their own loop in every column
GOALS = [("int4 wo g64", "fp32", "decode", 2.0), ("int4 wo g64", "bf16", "decode", 1.3),
         ("int4 wo g64", "llama.cpp Q4_0", "decode", 1.0),
         ("int8 wo", "llama.cpp Q8_0", "decode", 1.0), ("w8a8 int8", "fp32", "decode", 1.3),
         ("int4 wo g64", "bf16", "prefill", 1.2)]
HEADLINE = "int4 wo g64"
LOOPS = (("generate", "decode_tok_s"), ("lowbit loop", "lowbit_decode_tok_s"),
         ("lowbit compiled", "compiled_decode_tok_s"))


def timed(fn, repeats):
    """Median wall time of ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# --- lowbit / torch variants -------------------------------------------------------------
def torch_variant(name, base, args):
    """(model, kernel counts) of a torch variant, or (None, note) when it cannot run."""
    m = copy.deepcopy(base)
    kern = {}
    g = args.group_size
    if name == "bf16":
        m = m.to(torch.bfloat16)
    elif name in ("int8 wo", "int4 wo g64", "int4 wo g64 fp32"):
        if name == "int8 wo":
            lowbit.quantize(m, "int8-weight-only")
        else:
            lowbit.quantize(m, "int4-weight-only", group_size=g)
        kern = rt.convert(m)
        if not name.endswith("fp32"):
            m = m.to(torch.bfloat16)  # packed buffers keep their dtypes
    elif name == "int4 wo g64 + int8 head":
        # the tied LM head is half the bytes a token reads: untie it and give the head int8
        # per-channel weights (the embedding lookup keeps its bf16 table)
        m.config.tie_word_embeddings = False
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
        d = lowbit.recipes.load("int4-weight-only", group_size=g).to_dict()
        d["exclude"] = [p for p in d["exclude"] if p != "*lm_head"]
        d["targets"].append({"pattern": "*lm_head",
                             "weight": {"format": "int8", "granularity": "channel"}})
        lowbit.quantize(m, lowbit.recipes.load(d))
        kern = rt.convert(m)
        m = m.to(torch.bfloat16)
    elif name == "w8a8 int8":
        lowbit.quantize(m, "int8-dynamic")
        kern = rt.convert(m)
    elif name == "int4 g64 reference":
        lowbit.quantize(m, "int4-weight-only", group_size=g)
        kern = rt.convert(m, fast=False)
    elif name == "torchao int8 wo":
        if importlib.util.find_spec("torchao") is None:
            return None, "torchao is not installed: skipped"
        m = m.to(torch.bfloat16)
        try:
            from torchao.quantization import quantize_
            try:
                from torchao.quantization import Int8WeightOnlyConfig
                quantize_(m, Int8WeightOnlyConfig())
            except ImportError:
                from torchao.quantization import int8_weight_only
                quantize_(m, int8_weight_only())
        except Exception as e:  # noqa: BLE001 - torchao versions differ
            return None, f"torchao failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return m.eval(), dict(kern)


def run_torch(m, prompt, short, args):
    """(prefill s, generate tok/s, FastDecoder result, compiled FastDecoder result,
    {batch: generate tok/s in all})."""
    n = args.new_tokens
    with torch.no_grad():
        t_pre = timed(lambda: m(prompt, use_cache=False, logits_to_keep=1), args.repeats)

        def decode(ids):
            return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)

        torch.set_num_threads(args.decode_threads)
        try:
            ref = decode(short)[0, short.shape[1]:]
            t_dec = timed(lambda: decode(short), max(1, args.repeats - 1))
            fast = run_fast_decoder(m, short, args, ref)
            comp = {} if args.no_compile else run_fast_decoder(m, short, args, ref, True)
            batch = {}
            for b in args.batch:  # b distinct prompts of the same length, generate's loop
                ids = batch_prompts(prompt, short.shape[1], b)
                batch[str(b)] = b * n / timed(lambda: decode(ids), 1)
        finally:
            torch.set_num_threads(args.threads)
    return t_pre, n / t_dec, fast, comp, batch


def batch_prompts(prompt, length: int, b: int) -> torch.Tensor:
    """``[b, length]``: ``b`` windows of the long prompt (the first is the batch-1 prompt)."""
    step = max(1, (prompt.shape[1] - length) // max(1, b - 1))
    return torch.stack([prompt[0, i * step % (prompt.shape[1] - length + 1):][:length]
                        for i in range(b)])


def run_fast_decoder(m, short, args, ref, compile=False) -> dict:
    """Decode tok/s of lowbit's own loop (:class:`lowbit.runtime.FastDecoder`, with
    ``compile``: its step captured by ``torch.compile``) on the same model and prompt, its
    extra bytes, and how many of its greedy tokens equal ``generate``'s (``ref``; EOS
    suppressed in both). ``first_s``: the first generate (a compiled loop builds there)."""
    from lowbit.hardware import hardware_path_report
    from lowbit.runtime.decode import COMPILE_PATH
    n = args.new_tokens
    try:
        t = time.perf_counter()
        dec = rt.FastDecoder(m, compile=compile)
        build_s = time.perf_counter() - t
    except lowbit.errors.ConfigError as e:
        return {"note": str(e)}
    t = time.perf_counter()
    out = dec.generate(short, n)[0, short.shape[1]:]
    first_s = time.perf_counter() - t
    same = int((out == ref).int().cumprod(0).sum())
    t_dec = timed(lambda: dec.generate(short, n), max(1, args.repeats - 1))
    res = {"decode_tok_s": n / t_dec, "extra_mb": dec.extra_nbytes() / 1e6,
           "build_s": build_s, "first_s": first_s, "tokens_equal_generate": f"{same}/{n}"}
    if compile:
        res["compiled"] = hardware_path_report().get(COMPILE_PATH, "not run")
        if res["compiled"] != "hardware":  # fell back: not a compiled figure
            res["decode_tok_s"] = None
    return res


# --- llama.cpp ---------------------------------------------------------------------------
def gguf_file(base, tok, preset, args, tmp: Path) -> Path:
    m = copy.deepcopy(base)
    lowbit.quantize(m, preset)
    out = tmp / preset
    lowbit.save(m, out, format="gguf", tokenizer=tok, float_type=args.gguf_float_type)
    return out / "model.gguf"


def run_llama_cpp(path: Path, prompt, short, args):
    from llama_cpp import Llama

    n = args.new_tokens
    llm = Llama(model_path=str(path), n_ctx=max(args.prefill, 32 + n) + 64, n_batch=512,
                n_ubatch=512, n_threads=args.decode_threads, n_threads_batch=args.threads,
                verbose=False)
    ids = prompt[0].tolist()
    sids = short[0].tolist()

    def prefill():
        llm.reset()
        llm.eval(ids)

    def decode():
        llm.reset()  # no prompt-prefix reuse: the prompt is processed each time, as in HF
        k = 0
        for _ in llm.generate(sids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            k += 1
            if k == n:
                break

    t_pre = timed(prefill, args.repeats)
    t_dec = timed(decode, max(1, args.repeats - 1))
    llm.close()
    return t_pre, n / t_dec


def llama_cpp_child(path: Path, prompt, short, args) -> dict:
    """:func:`run_llama_cpp` in a child process (a crash of the native library, e.g. its
    AMX path on some VMs, becomes a note instead of killing the bench)."""
    import subprocess

    spec = path.with_suffix(".json")
    spec.write_text(json.dumps({"prompt": prompt[0].tolist(), "short": short[0].tolist(),
                                "threads": args.threads, "decode_threads": args.decode_threads,
                                "prefill": args.prefill, "new_tokens": args.new_tokens,
                                "repeats": args.repeats}))
    p = subprocess.run([sys.executable, __file__, "--llama-cpp-child", str(path), str(spec)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [""])[-1][:200]
        return {"error": f"llama.cpp exited with {p.returncode} ({tail or 'no message'}); "
                         "if it crashed in its AMX path (ggml_backend_amx_mul_mat, seen on "
                         "this VM), build llama-cpp-python with CMAKE_ARGS='-DGGML_AMX_TILE=OFF "
                         "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF'"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def llama_cpp_child_main(path: str, spec: str) -> None:
    """The child side of :func:`llama_cpp_child`: prints one JSON line."""
    d = json.loads(Path(spec).read_text())
    args = argparse.Namespace(**{k: d[k] for k in ("threads", "decode_threads", "prefill",
                                                   "new_tokens", "repeats")})
    t_pre, tok_s = run_llama_cpp(Path(path), torch.tensor([d["prompt"]]),
                                 torch.tensor([d["short"]]), args)
    print(json.dumps({"prefill_s": t_pre, "tok_s": tok_s}))


# --- GPU -----------------------------------------------------------------------------------
def cuda_time(fn, iters=50):
    """Median milliseconds per call of ``fn`` on CUDA (events, after warm-up)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def gpu_section() -> dict:
    """FP8 linear vs BF16 (4096^3) and int4 GEMV vs BF16 (M=1), or a note without CUDA."""
    if not torch.cuda.is_available():
        return {"note": "no CUDA device: GPU section skipped"}
    from lowbit.core import QuantSpec, quantize
    from lowbit.nn.quantizer import TensorQuantizer
    from lowbit.runtime import PackedLinear

    dev = torch.device("cuda")
    n = 4096
    w = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "rows": []}
    ms = cuda_time(lambda: torch.nn.functional.linear(x, w))
    flops = 2 * n ** 3
    out["rows"].append({"op": "bf16 linear 4096^3", "ms": ms, "tflops": flops / ms / 1e9})
    cases = [("fp8 tensor-wise", QuantSpec(format="fp8_e4m3"), QuantSpec(format="fp8_e4m3")),
             ("fp8 row-wise", QuantSpec(format="fp8_e4m3", granularity="channel"),
              QuantSpec(format="fp8_e4m3", granularity="token", dynamic=True))]
    for label, ws, xs in cases:
        iq = TensorQuantizer(xs, "input", "bench.input_quantizer")
        if not xs.dynamic:
            iq.set_amax(x.float().abs().amax().cpu())
        layer = PackedLinear.from_qtensor(quantize(w, ws), None, torch.bfloat16,
                                          input_quantizer=iq.to(dev), device=dev)
        with torch.no_grad():
            ms = cuda_time(lambda: layer(x))
        out["rows"].append({"op": f"{label} linear 4096^3 ({layer.kernel}, activation "
                                  "quantization included)", "ms": ms,
                            "tflops": flops / ms / 1e9})
    x1 = x[:1]
    ms_bf = cuda_time(lambda: torch.nn.functional.linear(x1, w), 200)
    out["rows"].append({"op": "bf16 GEMV 1x4096x4096", "ms": ms_bf,
                        "gb_s": w.numel() * 2 / ms_bf / 1e6})
    spec = QuantSpec(format="int4", granularity="group", group_size=128)
    layer = PackedLinear.from_qtensor(quantize(w.float(), spec), None, torch.bfloat16,
                                      device=dev)
    with torch.no_grad():
        ms = cuda_time(lambda: layer(x1), 200)
    out["rows"].append({"op": f"int4 g128 GEMV 1x4096x4096 ({layer.kernel})", "ms": ms,
                        "gb_s": layer.resident_nbytes() / ms / 1e6, "vs_bf16": ms_bf / ms})
    return out


# --- main --------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--llama-cpp-child":
        return llama_cpp_child_main(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--decode-threads", type=int, default=None,
                    help="threads while generating (default: --threads)")
    ap.add_argument("--gguf-float-type", default="bf16", choices=["f32", "f16", "bf16"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS,
                    metavar="VARIANT", help=f"some of: {', '.join(VARIANTS)}")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled FastDecoder loop (torch.compile)")
    ap.add_argument("--batch", type=int, nargs="*", default=[4, 16],
                    help="batch sizes > 1 for generate's decode throughput (tokens/s in all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "runtime.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.decode_threads is None:
        args.decode_threads = args.threads
    base, tok = load_model()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prefill), generator=g)
    short = prompt[:, :32]

    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        for name in args.variants:
            if name.startswith("llama.cpp"):
                if importlib.util.find_spec("llama_cpp") is None:
                    notes.append(f"{name}: llama_cpp is not installed: skipped")
                    continue
                path = gguf_file(base, tok, "gguf-" + name.split()[-1].lower(), args,
                                 Path(tmp))
                res = llama_cpp_child(path, prompt, short, args)
                if "error" in res:
                    notes.append(f"{name}: {res['error']}")
                    continue
                t_pre, tok_s = res["prefill_s"], res["tok_s"]
                row = {"variant": name, "weight_mb": path.stat().st_size / 1e6,
                       "packed_mb": None, "ratio": None, "prefill_s": t_pre,
                       "decode_tok_s": tok_s, "lowbit_decode_tok_s": tok_s,
                       "compiled_decode_tok_s": tok_s, "batch_tok_s": {},
                       "kernels": {"gguf": args.gguf_float_type}}
            else:
                m, kern = torch_variant(name, base, args)
                if m is None:
                    notes.append(f"{name}: {kern}")
                    continue
                rep = rt.memory_report(m)
                t_pre, tok_s, fast, comp, batch = run_torch(m, prompt, short, args)
                row = {"variant": name, "weight_mb": rep["resident"] / 1e6,
                       "packed_mb": rep["packed"] / 1e6, "ratio": rep["ratio"],
                       "prefill_s": t_pre, "decode_tok_s": tok_s,
                       "lowbit_decode_tok_s": fast.get("decode_tok_s"), "lowbit_decode": fast,
                       "compiled_decode_tok_s": comp.get("decode_tok_s"),
                       "lowbit_compiled": comp, "batch_tok_s": batch, "kernels": kern}
                del m
            rows.append(row)
            print(f"{name}: {row['weight_mb']:.1f} MB, prefill {row['prefill_s']:.3f} s, "
                  f"decode {row['decode_tok_s']:.2f} tok/s (generate), "
                  f"{row['lowbit_decode_tok_s'] or float('nan'):.2f} tok/s (lowbit loop), "
                  f"{row['compiled_decode_tok_s'] or float('nan'):.2f} tok/s (compiled), "
                  f"batch {row['batch_tok_s']} {row['kernels']} "
                  f"{row.get('lowbit_decode', '')} {row.get('lowbit_compiled', '')}", flush=True)
    by = {r["variant"]: r for r in rows}
    ref = by.get("fp32") or (rows[0] if rows else None)
    print()
    print("SmolLM2-135M-Instruct (fp32 = its Q4_1 GGUF dequantized) "
          f"on {args.threads} threads ({args.decode_threads} while decoding); "
          f"prefill {args.prefill} tokens; decode "
          f"{args.new_tokens} tokens after 32, batch 1, greedy")
    print("tok/s: transformers' generate / lowbit's FastDecoder loop / the same loop "
          "captured by torch.compile (llama.cpp: its own loop in every column); batch B: "
          "generate's tokens/s in all for B prompts (llama.cpp: not run)")
    bs = [str(b) for b in args.batch]
    print(f"{'variant':24s} {'weights MB':>10s} {'/packed':>8s} {'prefill s':>9s} "
          f"{'tok/s gen':>9s} {'tok/s lowbit':>12s} {'compiled':>8s} {'vs FP32':>7s}"
          + "".join(f" {'b' + b:>7s}" for b in bs))
    nan = float("nan")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lb = r["lowbit_decode_tok_s"] or nan
        vs = lb / (ref["lowbit_decode_tok_s"] or nan) if ref else nan
        print(f"{r['variant']:24s} {r['weight_mb']:10.1f} {ratio:>8s} {r['prefill_s']:9.3f} "
              f"{r['decode_tok_s']:9.2f} {lb:12.2f} {r['compiled_decode_tok_s'] or nan:8.2f} "
              f"{vs:6.2f}x" + "".join(f" {r['batch_tok_s'].get(b, nan):7.1f}" for b in bs))
    goals = []
    print("\ngoals (decode: tok/s ratio per loop, >= goal; prefill: time ratio, <= goal):")
    for var, other, what, target in GOALS:
        if var not in by or other not in by:
            continue
        a, b = by[var], by[other]
        if what == "prefill":
            r = a["prefill_s"] / b["prefill_s"]
            goals.append({"variant": var, "vs": other, "what": what, "ratio": r,
                          "goal": target, "met": r <= target})
            print(f"  {var} prefill / {other}: {r:5.2f}x (goal <= {target}x) "
                  f"{'met' if r <= target else 'NOT met'}")
            continue
        for loop, key in LOOPS:
            if not a.get(key) or not b.get(key):
                continue
            r = a[key] / b[key]
            goals.append({"variant": var, "vs": other, "what": what, "loop": loop,
                          "ratio": r, "goal": target, "met": r >= target})
            print(f"  {var} decode / {other} ({loop}): {r:5.2f}x (goal >= {target}x) "
                  f"{'met' if r >= target else 'NOT met'}")
    if HEADLINE in by:
        h = by[HEADLINE]
        if h["ratio"] is not None:
            ok = abs(h["ratio"] - 1) <= 0.05
            goals.append({"vs": "packed size", "ratio": h["ratio"], "goal": 1.05, "met": ok})
            print(f"  resident / packed {h['ratio']:.3f} (goal within 5%) "
                  f"{'met' if ok else 'NOT met'}")
            extra = (h.get("lowbit_decode") or {}).get("extra_mb")
            if extra is not None:  # FastDecoder's copied int4 scales count too
                r = (h["weight_mb"] + extra) / h["packed_mb"]
                ok = abs(r - 1) <= 0.05
                goals.append({"vs": "packed size", "loop": "lowbit loop", "ratio": r,
                              "goal": 1.05, "met": ok})
                print(f"  resident + FastDecoder's copies / packed {r:.3f} (goal within 5%) "
                      f"{'met' if ok else 'NOT met'}")
    for note in notes:
        print(f"note: {note}")
    gpu = {"note": "skipped (--no-gpu)"} if args.no_gpu else gpu_section()
    print("\nGPU:", gpu.get("note", ""))
    for r in gpu.get("rows", []):
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{v}"
                               for k, v in r.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "decode_threads": args.decode_threads, "torch": torch.__version__, "prefill": args.prefill,
            "new_tokens": args.new_tokens, "gguf_float_type": args.gguf_float_type,
            "argv": sys.argv[1:]}
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals, "notes": notes,
                                   "gpu": gpu}, indent=2))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
