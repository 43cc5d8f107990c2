"""Streaming quantization of a checkpoint larger than the memory it may use, and the
speed-up of data-parallel calibration.

1. **Checkpoint.** A synthetic Llama-shaped transformers checkpoint (seeded random BF16
   weights, std 0.02, norms 1) is written shard by shard (one shard per decoder block, one
   for the embeddings, one for the head; never more than one tensor in memory) to
   ``--cache`` (default ``~/.cache/lowbit/bench``) and reused when present. Default: 24
   layers, hidden 4096, intermediate 11008, 32 heads, vocabulary 32000: 5.11 G parameters,
   10.2 GB in BF16 (``--layers``, ``--hidden``, ``--intermediate`` make it smaller).
2. **Streaming.** ``lowbit.pipeline.quantize_checkpoint`` with int4 GPTQ (group 128) on
   ``--samples`` x ``--seq`` random token ids, in a fresh process whose peak RSS
   (``getrusage``: every byte the process ever held resident, file pages included) is
   compared with the checkpoint's size (goal: <= 0.25). Time per block: reading its
   weights, the algorithm + calibration, writing its quantized tensors.
3. **Data-parallel calibration.** On a smaller checkpoint (``--dp-*``, default 4 layers of
   hidden 1024), the same streamed job with more calibration data (``--dp-samples`` x
   ``--dp-seq``), run by one process (1 thread, and ``--threads`` threads) and by
   ``torchrun --nproc-per-node 2`` (1 thread each: the same cores), for a calibration-only
   recipe (static int8 W8A8: forward passes and observers) and for int4 GPTQ (each rank
   still inverts every Hessian: only the forward passes and Hessian sums are split).
   Speed-up = the faster single process / two processes, over the whole call and over the
   blocks alone (without reading and writing).

Prints tables and writes ``bench/results/scale.json``. Runs at low priority (nice 10).

    python bench/scale.py [--layers 24] [--hidden 4096] [--intermediate 11008]
        [--samples 4] [--seq 128] [--threads 2] [--skip-stream] [--skip-dp]
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

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "scale.json"


# --- the synthetic checkpoint -------------------------------------------------------------------
def config_dict(layers: int, hidden: int, inter: int, heads: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads,
            "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2, "hidden_act": "silu", "rope_theta": 10000.0}


def block_shapes(hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {"input_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (hidden, hidden),
            "self_attn.k_proj.weight": (hidden, hidden),
            "self_attn.v_proj.weight": (hidden, hidden),
            "self_attn.o_proj.weight": (hidden, hidden),
            "post_attention_layernorm.weight": (hidden,),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter)}


def make_checkpoint(path: Path, layers: int, hidden: int, inter: int, heads: int, vocab: int,
                    seed: int = 0) -> Path:
    """Write (or reuse) the synthetic checkpoint at ``path``; returns it."""
    import torch
    from safetensors.torch import save_file

    if (path / ".complete").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        shards.append({f"model.layers.{i}.{k}": s for k, s in block_shapes(hidden, inter).items()})
    shards.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for j, shapes in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k, s in shapes.items():
            if len(s) == 1:
                t = torch.ones(s, dtype=torch.bfloat16)
            else:
                t = torch.empty(s, dtype=torch.float32).normal_(0, 0.02, generator=g)
                t = t.to(torch.bfloat16)
            tensors[k] = t
            weight_map[k] = name
            total += t.numel() * 2
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(
        config_dict(layers, hidden, inter, heads, vocab), indent=1))
    (tmp / ".complete").write_text("ok\n")
    os.replace(tmp, path)
    return path


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# --- one streamed run (child process, or a torchrun rank) ---------------------------------------
def worker(args) -> None:
    """Quantize ``args.src`` by streaming; rank 0 writes its measurements to ``args.report``."""
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    from lowbit.pipeline import distributed as D
    from lowbit.pipeline import quantize_checkpoint

    comm = D.init_from_env(backend="gloo")
    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    g = torch.Generator().manual_seed(1)
    vocab = json.loads((Path(args.src) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.samples, args.seq), generator=g)
    rss = []

    def progress(done, total, name):
        rss.append(proc.memory_info().rss)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"  [rank {comm.rank}] {name} done ({done}/{total}), "
              f"RSS {rss[-1] / 2**30:.2f} GiB, peak so far {peak / 2**30:.2f} GiB", flush=True)

    overrides = {"group_size": args.group_size} if "int4" in args.recipe else {}
    t0 = time.perf_counter()
    r = quantize_checkpoint(args.src, args.recipe, ids, args.out, chunk_size=args.chunk_size,
                            overwrite=True, resume=False, progress=progress, **overrides)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if comm.is_main:
        Path(args.report).write_text(json.dumps({
            "seconds": seconds, "peak_rss": peak, "base_rss": base_rss,
            "rss_after_block": rss, "blocks": r.blocks, "world_size": comm.world_size,
            "threads": args.threads, "source_bytes": r.source_bytes}))
    D.shutdown()


def run_worker(src: Path, recipe: str, samples: int, seq: int, threads: int, nproc: int,
               work: Path, chunk_size: int = 8, group_size: int = 128) -> dict:
    report = work / f"report-{recipe}-{nproc}x{threads}.json"
    out = work / f"out-{recipe}-{nproc}x{threads}"
    argv = [str(Path(__file__).resolve()), "--_worker", "--src", str(src), "--out", str(out),
            "--report", str(report), "--recipe", recipe, "--samples", str(samples),
            "--seq", str(seq), "--threads", str(threads), "--chunk-size", str(chunk_size),
            "--group-size", str(group_size)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + os.getpid() % 1000), *argv]
    else:
        cmd = [sys.executable, *argv]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(report.read_text())


# --- tables ---------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print(line)
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    print(line)


def stream_summary(cfg: dict, src: Path, res: dict) -> dict:
    size = checkpoint_bytes(src)
    blocks = [b for b in res["blocks"]]
    per = [b["seconds"] for b in blocks]
    return {"config": cfg, "checkpoint_bytes": size, "peak_rss_bytes": res["peak_rss"],
            "rss_after_imports_bytes": res["base_rss"],
            "peak_rss_over_checkpoint": res["peak_rss"] / size,
            "seconds_total": res["seconds"],
            "seconds_per_block": {"mean": sum(per) / len(per), "min": min(per), "max": max(per)},
            "read_seconds_per_block": sum(b["load_seconds"] for b in blocks) / len(blocks),
            "compute_seconds_per_block": sum(b.get("compute_seconds", b["seconds"] -
                                                   b["load_seconds"] - b["write_seconds"])
                                             for b in blocks) / len(blocks),
            "write_seconds_per_block": sum(b["write_seconds"] for b in blocks) / len(blocks),
            "rss_after_block_bytes": res["rss_after_block"], "blocks": blocks,
            "threads": res["threads"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--recipe", default="int4-gptq")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lowbit" / "bench")
    p.add_argument("--dp-layers", type=int, default=4)
    p.add_argument("--dp-hidden", type=int, default=1024)
    p.add_argument("--dp-intermediate", type=int, default=2816)
    p.add_argument("--dp-samples", type=int, default=32)
    p.add_argument("--dp-seq", type=int, default=256)
    p.add_argument("--dp-recipes", nargs="+", default=["int8", "int4-gptq"])
    p.add_argument("--skip-stream", action="store_true")
    p.add_argument("--skip-dp", action="store_true")
    p.add_argument("--keep-output", action="store_true", help="keep the quantized outputs")
    # internal: one streamed run
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        worker(args)
        return
    os.nice(10)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "threads": args.threads}
    work = Path(tempfile.mkdtemp(prefix="lowbit-scale-"))
    if not args.skip_stream:
        cfg = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
               "heads": args.heads, "vocab": args.vocab, "dtype": "bfloat16",
               "recipe": f"{args.recipe} g{args.group_size}",
               "calibration": f"{args.samples} x {args.seq} random token ids"}
        name = f"llama-L{args.layers}-H{args.hidden}-I{args.intermediate}-V{args.vocab}-bf16"
        print(f"checkpoint {name}:", flush=True)
        src = make_checkpoint(args.cache / name, args.layers, args.hidden, args.intermediate,
                              args.heads, args.vocab)
        print(f"streaming {args.recipe} over {args.layers} blocks...", flush=True)
        res = run_worker(src, args.recipe, args.samples, args.seq, args.threads, 1, work,
                         args.chunk_size, args.group_size)
        s = stream_summary(cfg, src, res)
        results["stream"] = s
        spb = s["seconds_per_block"]
        print_table(f"streaming {cfg['recipe']}, {cfg['calibration']}, {args.threads} threads",
                    ["model", "checkpoint", "peak RSS", "RSS / ckpt", "goal", "total",
                     "s/block (mean, min-max)", "read s/block", "compute s/block",
                     "write s/block"],
                    [[f"{args.layers} x {args.hidden}/{args.intermediate}",
                      f"{s['checkpoint_bytes'] / 1e9:.2f} GB", gib(s["peak_rss_bytes"]),
                      f"{s['peak_rss_over_checkpoint']:.3f}", "<= 0.25",
                      f"{s['seconds_total'] / 60:.1f} min",
                      f"{spb['mean']:.1f} ({spb['min']:.1f}-{spb['max']:.1f})",
                      f"{s['read_seconds_per_block']:.2f}",
                      f"{s['compute_seconds_per_block']:.1f}",
                      f"{s['write_seconds_per_block']:.2f}"]])
        OUT.write_text(json.dumps(results, indent=1) + "\n")
    if not args.skip_dp:
        name = (f"llama-L{args.dp_layers}-H{args.dp_hidden}-I{args.dp_intermediate}"
                f"-V{args.vocab}-bf16")
        src = make_checkpoint(args.cache / name, args.dp_layers, args.dp_hidden,
                              args.dp_intermediate, max(1, args.dp_hidden // 128), args.vocab)
        rows, dp = [], []
        for recipe in args.dp_recipes:
            runs = {"1x1": run_worker(src, recipe, args.dp_samples, args.dp_seq, 1, 1, work),
                    f"1x{args.threads}": None,
                    "2x1": run_worker(src, recipe, args.dp_samples, args.dp_seq, 1, 2, work)}
            if args.threads > 1:
                runs[f"1x{args.threads}"] = run_worker(src, recipe, args.dp_samples, args.dp_seq,
                                                       args.threads, 1, work)
            runs = {k: v for k, v in runs.items() if v is not None}
            best1 = min(v["seconds"] for k, v in runs.items() if k.startswith("1x"))
            two = runs["2x1"]["seconds"]
            calib = lambda r: sum(b.get("compute_seconds",  # noqa: E731
                                        b["seconds"] - b["load_seconds"] - b["write_seconds"])
                                  for b in r["blocks"])
            dp.append({"recipe": recipe, "config": {"layers": args.dp_layers,
                       "hidden": args.dp_hidden, "intermediate": args.dp_intermediate,
                       "calibration": f"{args.dp_samples} x {args.dp_seq}"},
                       "runs": {k: {"seconds": v["seconds"], "block_seconds": calib(v)}
                                for k, v in runs.items()},
                       "speedup": best1 / two,
                       "speedup_blocks": min(calib(v) for k, v in runs.items()
                                             if k.startswith("1x")) / calib(runs["2x1"])})
            rows.append([recipe, f"{args.dp_layers} x {args.dp_hidden}/{args.dp_intermediate}",
                         f"{args.dp_samples} x {args.dp_seq}",
                         *[f"{runs[k]['seconds']:.1f} s" if k in runs else "-"
                           for k in ("1x1", f"1x{args.threads}")],
                         f"{two:.1f} s", f"{best1 / two:.2f}x",
                         f"{dp[-1]['speedup_blocks']:.2f}x"])
        results["data_parallel"] = dp
        print_table("data-parallel calibration (streamed; torchrun --nproc-per-node 2, gloo, "
                    "1 thread per rank)",
                    ["recipe", "model", "calibration", "1 proc x 1 thr",
                     f"1 proc x {args.threads} thr", "2 procs x 1 thr", "speed-up (total)",
                     "speed-up (blocks)"], rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    if not args.keep_output:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
