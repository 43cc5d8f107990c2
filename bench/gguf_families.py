"""llama.cpp reads lowbit's GGUF files: every family GGUF export supports, run by llama.cpp
itself, logits and tokens compared with lowbit's model.

A correctness check, not a quality claim: the models are the tiny seeded random-weight
configs of the tests (``tests/tiny_models.py``, ``tests/moe_models.py``), so that every family
is covered without a checkpoint from a hub; the SentencePiece families get the tiny offline
tokenizers of ``tests/export/tiny_tokenizers.py`` (their embeddings resized to the
vocabulary), the others are written vocabulary-less and fed token ids.

For each family and each variant (``f32``: the float model; ``q8_0``/``q4_0``: quantized
with the ``gguf-q8_0``/``gguf-q4_0`` presets, written exactly) the file is loaded by
llama.cpp (llama-cpp-python's bindings over a llama.cpp build, in a child process so that a
crash is a row, not the end of the bench) and evaluated on the same 24 token ids; the table
gives the largest logit difference relative to the largest logit of lowbit's model (all
positions) and how many positions have the same top-1 token. llama.cpp quantizes
activations to 8 bits for the quantized matmuls, so the quantized rows differ by more than
the float ones. With a tokenizer, ``tokens`` says whether llama.cpp's tokenization of a
sample text equals the transformers tokenizer's.

llama.cpp comes from the source inside the ``llama-cpp-python`` sdist, built with CMake
(AMX off: see docs/runtime.md), e.g.::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \\
        -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    cmake --build build -j2 --target llama

then ``python bench/gguf_families.py --llama-cpp DIR --pythonpath SITE`` where ``DIR`` is the
unpacked sdist (its ``llama_cpp`` package is imported from there and its library from
``vendor/llama.cpp/build/bin``) and ``SITE`` holds the bindings' one missing dependency
(``pip install --target SITE diskcache``). Or with llama-cpp-python installed, no option. Without
either, the bench says so and stops. Writes ``bench/results/gguf_families.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lowbit  # noqa: E402

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_mm", "phi3",
         "olmo2", "granite", "gpt2"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
TOKENIZERS = {"llama": "llama2_tokenizer", "gemma2": "gemma_tokenizer",
              "gemma3": "gemma_tokenizer", "gemma3_mm": "gemma_tokenizer",
              "phi3": "phi3_tokenizer"}
VARIANTS = {"f32": None, "q8_0": "gguf-q8_0", "q4_0": "gguf-q4_0"}
N_IDS = 24


def build_family(family: str):
    """(model, tokenizer or None) for ``family``, seeded."""
    from tests.tiny_models import build

    if family in MOE:
        from tests.moe_models import build_moe
        m = build_moe(family)
    else:
        m = build(family)
    cfg = getattr(m.config, "text_config", m.config)
    if getattr(cfg, "query_pre_attn_scalar", None) is not None:
        # released Gemmas scale attention by 1/sqrt(head_dim), the only scale llama.cpp's
        # gemma archs apply; the tiny configs keep transformers' default 256 (head_dim 16)
        cfg.query_pre_attn_scalar = cfg.head_dim
        for mod in m.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "scaling"):
                mod.scaling = cfg.head_dim ** -0.5
    tok = None
    if family in TOKENIZERS:
        from tests.export import tiny_tokenizers
        tok = getattr(tiny_tokenizers, TOKENIZERS[family])()
        torch.manual_seed(0)
        m.resize_token_embeddings(len(tok))
        m.eval()
    return m, tok


def lowbit_logits(m, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float()


def child(path: str, spec: str) -> None:
    """Load ``path`` in llama.cpp, print one JSON line: logits of the ids, tokens of text."""
    from llama_cpp import Llama

    d = json.loads(Path(spec).read_text())
    # KV cache in F32 (llama.cpp's default is F16, which alone moves logits by ~2e-4)
    llm = Llama(model_path=path, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=d["threads"],
                n_threads_batch=d["threads"], logits_all=True, verbose=False,
                type_k=0, type_v=0)
    llm.eval(d["ids"])
    logits = [list(map(float, row)) for row in llm.scores[:len(d["ids"])]]
    toks = None
    if d.get("text") is not None:
        toks = llm.tokenize(d["text"].encode(), add_bos=True, special=False)
    print(json.dumps({"logits": logits, "tokens": toks}))


def run_child(path: Path, ids, text, args) -> dict:
    spec = path.with_suffix(".json")
    spec.write_text(json.dumps({"ids": ids, "text": text, "threads": args.threads}))
    env = dict(os.environ)
    if args.llama_cpp:
        src = Path(args.llama_cpp)
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + args.pythonpath +
                                            [env.get("PYTHONPATH", "")])
        env["LLAMA_CPP_LIB_PATH"] = str(src / "vendor" / "llama.cpp" / "build" / "bin")
    p = subprocess.run([sys.executable, __file__, "--child", str(path), str(spec)],
                       capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no message"])[-1][:200]
        return {"error": f"llama.cpp exited with {p.returncode}: {tail}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def one(family: str, variant: str, args, tmp: Path) -> dict:
    m, tok = build_family(family)
    preset = VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the multimodal vision tower's coverage line
        if preset is not None:
            lowbit.quantize(m, preset)
        elif family in MOE:  # a float export needs the experts split, as quantize does
            from lowbit.adapters.experts import unfuse_experts
            unfuse_experts(m)
        out = tmp / f"{family}-{variant}"
        t0 = time.perf_counter()
        try:
            lowbit.save(m, out, format="gguf", tokenizer=tok)
        except Exception as e:  # noqa: BLE001 - a refusal is a row
            return {"family": family, "variant": variant,
                    "error": f"export refused: {type(e).__name__}: {str(e).splitlines()[0]}"}
    export_s = time.perf_counter() - t0
    vocab = m.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    lo = 3 if tok is not None else 0
    ids = torch.randint(lo, vocab, (N_IDS,), generator=g).tolist()
    if tok is not None and tok.bos_token_id is not None:
        ids[0] = tok.bos_token_id
    ref = lowbit_logits(m, ids)
    text = None
    if tok is not None:
        from tests.export.tiny_tokenizers import SAMPLE
        text = SAMPLE
    res = run_child(out / "model.gguf", ids, text, args)
    row = {"family": family, "variant": variant, "export_s": round(export_s, 3),
           "file_kb": round((out / "model.gguf").stat().st_size / 1024, 1)}
    if "error" in res:
        row["error"] = res["error"]
        return row
    got = torch.tensor(res["logits"])
    row["max_rel_diff"] = float((got - ref).abs().max() / ref.abs().max())
    row["top1_same"] = f"{int((got.argmax(-1) == ref.argmax(-1)).sum())}/{len(ids)}"
    if text is not None:
        want = tok(text).input_ids
        row["tokens"] = "equal" if res["tokens"] == want else \
            f"differ ({len(res['tokens'])} vs {len(want)} ids)"
    return row


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", default=None,
                    help="unpacked llama-cpp-python sdist with vendor/llama.cpp/build/bin")
    ap.add_argument("--pythonpath", action="append", default=[],
                    help="extra folder for the llama.cpp child's imports (the bindings need "
                         "diskcache: pip install --target DIR diskcache)")
    ap.add_argument("--families", default=",".join(DENSE + MOE))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_families.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fams = args.families.split(",")
    variants = args.variants.split(",")
    for f in fams:
        if f not in DENSE + MOE:
            ap.error(f"unknown family {f!r}; expected some of {', '.join(DENSE + MOE)}")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; expected some of {', '.join(VARIANTS)}")
    if args.llama_cpp is None:
        import importlib.util
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp is not available: install llama-cpp-python or pass --llama-cpp "
                  "(see the module doc); nothing measured")
            return
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for f in fams:
            for v in variants:
                r = one(f, v, args, Path(d))
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{'family':<11} {'variant':<6} {'max |dlogit|/max':>17} {'top-1 same':>10} "
          f"{'tokens':>8}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:<11} {r['variant']:<6} {'-':>17} {'-':>10} {'-':>8}  "
                  f"{r['error']}")
            continue
        print(f"{r['family']:<11} {r['variant']:<6} {r['max_rel_diff']:>17.2e} "
              f"{r['top1_same']:>10} {r.get('tokens', 'no vocab'):>8}")
    meta = {"llama_cpp": args.llama_cpp or "installed llama_cpp", "threads": args.threads,
            "n_ids": N_IDS, "torch": torch.__version__,
            "note": "tiny seeded random-weight models: a correctness check, not quality"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
