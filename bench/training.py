"""Training with quantization: QAT/QAD of SmolLM2-135M, and FP8 training from scratch.

QAT/QAD: the real model quantized with a hard recipe (default W4A8: INT4 group-64 weights,
static FP8 E4M3 activations) by PTQ (RTN + max calibration), then fine-tuned by distillation
from the FP32 model (SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to float32; KL of the
next-token distributions) on random windows of the
calibration part (first 80%) of austen_pp.txt; perplexity on the held-out last 20%.

FP8: a small Llama (4 layers, hidden 256, byte-level tokens) trained from scratch on
pydocs_tut_ref.txt in FP32 and with FP8 hybrid delayed scaling (E4M3 forward, E5M2
gradients, amax history 1024), same seed and batches; the loss of the held-out last 20%.

Prints a table and writes bench/results/training.json.

    python bench/training.py [--part all|qat|fp8] [--qat-steps 60] [--windows 16] ...
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# 2 threads on a shared 2-core machine: OpenMP's default spin-waiting makes each parallel
# region wait for a descheduled thread (3-5x slower here); passive waiting avoids it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data import (load_model, read_text, split_tokens, tokenize,  # noqa: E402
                         windows_from_ids)
from lowbit.data.text import forward_loop_from_batches  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.training import (distill_loss, finalize_qat, fp8_autocast,  # noqa: E402
                             param_groups, prepare_qat)

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _clock(t0: float) -> str:
    s = int(time.perf_counter() - t0)
    return f"{s // 60}:{s % 60:02d}"


def run_qat(args) -> dict:
    t0 = time.perf_counter()
    teacher, tok = load_model()
    ids = tokenize(tok, read_text(args.text))
    calib_ids, eval_ids = split_tokens(ids, 0.8)

    def ppl(m, what):
        t = time.perf_counter()
        r = perplexity(m, eval_ids, seq_len=512, n_windows=args.windows)
        print(f"  [{_clock(t0)}] {what}: ppl {r['ppl']:.3f} ({r['windows']} windows x 512, "
              f"{time.perf_counter() - t:.0f} s)", flush=True)
        return r

    print(f"QAT/QAD on SmolLM2-135M, recipe {args.qat_recipe}, scales {args.qat_scales}",
          flush=True)
    fp = ppl(teacher, "fp32 (dequantized Q4_1 GGUF)")
    student = copy.deepcopy(teacher)
    calib = windows_from_ids(calib_ids, args.calib_samples, 512, seed=0)
    t = time.perf_counter()
    over = {"group_size": args.group_size} if args.group_size else {}
    prepare_qat(student, args.qat_recipe, forward_loop_from_batches(calib),
                scales=args.qat_scales, **over)
    ptq_s = time.perf_counter() - t
    print(f"  [{_clock(t0)}] PTQ (RTN + {args.calib_samples} calibration windows) "
          f"{ptq_s:.0f} s", flush=True)
    ptq = ppl(student, "ptq")  # the prepared model computes exactly what PTQ computes

    train = windows_from_ids(calib_ids, args.qat_steps * args.qat_batch, args.qat_seq, seed=1)
    opt = torch.optim.AdamW(param_groups(student, args.qat_lr, args.qat_scale_lr),
                            betas=(0.9, 0.95), weight_decay=0.0)
    teacher.eval()
    student.train()
    t_train = time.perf_counter()
    losses = []
    for step in range(args.qat_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.qat_steps, g.setdefault("base_lr", g["lr"]),
                             args.warmup)
        x = train[step * args.qat_batch:(step + 1) * args.qat_batch]
        with torch.no_grad():
            t_logits = teacher(x).logits
        loss = distill_loss(student(x).logits, t_logits, T=args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.qat_steps:
            el = time.perf_counter() - t_train
            eta = el / (step + 1) * (args.qat_steps - step - 1)
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            print(f"  [{_clock(t0)}] step {step + 1}/{args.qat_steps} KL {recent:.4f} "
                  f"({el / (step + 1):.1f} s/step, ETA {eta / 60:.1f} min)", flush=True)
    train_s = time.perf_counter() - t_train
    student.eval()
    finalize_qat(student)
    qat = ppl(student, "qat")
    # export after QAT works as after PTQ: native checkpoint, reloaded bit-exactly
    with tempfile.TemporaryDirectory() as d:
        lowbit.save(student, Path(d) / "ck")
        back = lowbit.load(Path(d) / "ck")
        x = eval_ids[:128][None]
        with torch.no_grad():
            exact = bool(torch.equal(back(x).logits, student(x).logits))
    gap = ptq["ppl"] - fp["ppl"]
    closed = 100 * (ptq["ppl"] - qat["ppl"]) / gap if gap > 0 else float("nan")
    return {"recipe": args.qat_recipe, "group_size": args.group_size,
            "scales": args.qat_scales, "loss": "KL(teacher||student)",
            "temperature": args.temperature, "steps": args.qat_steps, "batch": args.qat_batch,
            "seq_len": args.qat_seq, "train_tokens": args.qat_steps * args.qat_batch *
            args.qat_seq, "lr": args.qat_lr, "scale_lr": args.qat_scale_lr or args.qat_lr,
            "calib_samples": args.calib_samples, "windows": fp["windows"],
            "fp32_ppl": fp["ppl"], "ptq_ppl": ptq["ppl"], "qat_ppl": qat["ppl"],
            "gap_closed_pct": closed, "first_kl": sum(losses[:5]) / len(losses[:5]),
            "last_kl": sum(losses[-5:]) / len(losses[-5:]), "ptq_s": ptq_s,
            "train_s": train_s, "s_per_step": train_s / max(1, args.qat_steps),
            "export_roundtrip_exact": exact, "total_s": time.perf_counter() - t0}


def _tiny_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.fp8_hidden,
                      intermediate_size=args.fp8_hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=args.fp8_layers, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=args.fp8_seq,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _fp8_run(name, model, batches, eval_x, args, t0) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.fp8_lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    model.train()
    fp8 = name != "fp32"
    losses = []
    t = time.perf_counter()
    for step, x in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, len(batches), args.fp8_lr, args.warmup)
        if fp8:
            with fp8_autocast(model, amax_history_len=args.amax_history):
                loss = model(x, labels=x).loss
        else:
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % (args.log_every * 5) == 0 or step + 1 == len(batches):
            print(f"  [{_clock(t0)}] {name} step {step + 1}/{len(batches)} loss "
                  f"{sum(losses[-20:]) / len(losses[-20:]):.4f} "
                  f"({(time.perf_counter() - t) / (step + 1):.2f} s/step)", flush=True)
    train_s = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        if fp8:
            with fp8_autocast(model):
                ev = sum(model(e[None], labels=e[None]).loss.item() for e in eval_x)
        else:
            ev = sum(model(e[None], labels=e[None]).loss.item() for e in eval_x)
    return {"run": name, "final_train_loss": sum(losses[-20:]) / 20,
            "eval_loss": ev / len(eval_x), "train_s": train_s}


def run_fp8(args) -> dict:
    t0 = time.perf_counter()
    data = read_text(args.fp8_text).encode("utf-8")
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    train_ids, eval_ids = split_tokens(ids, 0.8)
    batches = list(windows_from_ids(train_ids, args.fp8_steps * args.fp8_batch, args.fp8_seq,
                                    seed=args.seed).split(args.fp8_batch))
    eval_x = eval_ids[:args.fp8_eval_windows * args.fp8_seq].reshape(-1, args.fp8_seq)
    base = _tiny_llama(args)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"FP8 training from scratch: Llama {args.fp8_layers} layers, hidden "
          f"{args.fp8_hidden}, {n_params / 1e6:.2f}M parameters, byte tokens, "
          f"{args.fp8_steps} steps x {args.fp8_batch} x {args.fp8_seq}", flush=True)
    rows = [_fp8_run("fp32", copy.deepcopy(base), batches, eval_x, args, t0),
            _fp8_run("fp8-hybrid-delayed", copy.deepcopy(base), batches, eval_x, args, t0)]
    fp32, fp8 = rows
    return {"model": f"Llama L{args.fp8_layers} H{args.fp8_hidden} (byte-level, "
                     f"{n_params / 1e6:.2f}M params)", "text": Path(args.fp8_text).name,
            "steps": args.fp8_steps, "batch": args.fp8_batch, "seq_len": args.fp8_seq,
            "lr": args.fp8_lr, "amax_history_len": args.amax_history,
            "eval_windows": len(eval_x), "rows": rows,
            "eval_loss_ratio": fp8["eval_loss"] / fp32["eval_loss"],
            "train_loss_ratio": fp8["final_train_loss"] / fp32["final_train_loss"],
            "total_s": time.perf_counter() - t0}


def _print_tables(res: dict) -> None:
    q = res.get("qat")
    if q:
        print()
        print(f"QAT/QAD, SmolLM2-135M, {q['recipe']} (group {q['group_size']}), scales "
              f"{q['scales']}, {q['steps']} steps x {q['batch']} x {q['seq_len']} tokens, "
              f"lr {q['lr']:g}; held-out last 20% of austen_pp.txt, {q['windows']} windows x 512; "
              "fp32 = the Q4_1 GGUF dequantized")
        print(f"{'model':10s} {'ppl':>8s} {'vs fp32':>8s}")
        for k in ("fp32", "ptq", "qat"):
            p = q[f"{k}_ppl"]
            print(f"{k:10s} {p:8.3f} {100 * (p / q['fp32_ppl'] - 1):+7.2f}%")
        print(f"gap closed by QAT: {q['gap_closed_pct']:.1f}%  (train {q['train_s'] / 60:.1f} "
              f"min, {q['s_per_step']:.1f} s/step; export round-trip exact: "
              f"{q['export_roundtrip_exact']})")
    f = res.get("fp8")
    if f:
        print()
        print(f"FP8 training, {f['model']}, {f['steps']} steps x {f['batch']} x "
              f"{f['seq_len']}, held-out {f['eval_windows']} windows")
        print(f"{'run':20s} {'train loss':>11s} {'eval loss':>10s} {'train s':>8s}")
        for r in f["rows"]:
            print(f"{r['run']:20s} {r['final_train_loss']:11.4f} {r['eval_loss']:10.4f} "
                  f"{r['train_s']:8.0f}")
        print(f"fp8/fp32 eval loss ratio {f['eval_loss_ratio']:.4f} "
              f"({100 * (f['eval_loss_ratio'] - 1):+.2f}%), train loss ratio "
              f"{f['train_loss_ratio']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "qat", "fp8"], default="all")
    ap.add_argument("--text", type=Path, default=DATA / "austen_pp.txt")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--qat-recipe", default="w4a8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--qat-scales", default="frozen", choices=["frozen", "learnable", "absmax"])
    ap.add_argument("--qat-steps", type=int, default=60)
    ap.add_argument("--qat-batch", type=int, default=1)
    ap.add_argument("--qat-seq", type=int, default=256)
    ap.add_argument("--qat-lr", type=float, default=3e-5)
    ap.add_argument("--qat-scale-lr", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--fp8-text", type=Path, default=DATA / "pydocs_tut_ref.txt")
    ap.add_argument("--fp8-steps", type=int, default=300)
    ap.add_argument("--fp8-batch", type=int, default=8)
    ap.add_argument("--fp8-seq", type=int, default=128)
    ap.add_argument("--fp8-hidden", type=int, default=256)
    ap.add_argument("--fp8-layers", type=int, default=4)
    ap.add_argument("--fp8-lr", type=float, default=1e-3)
    ap.add_argument("--fp8-eval-windows", type=int, default=64)
    ap.add_argument("--amax-history", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "training.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "argv": sys.argv[1:]}}
    if args.out.exists():  # keep the other part's result when running one part
        old = json.loads(args.out.read_text())
        res.update({k: v for k, v in old.items() if k in ("qat", "fp8")})
    if args.part in ("all", "qat"):
        res["qat"] = run_qat(args)
    if args.part in ("all", "fp8"):
        res["fp8"] = run_fp8(args)
    _print_tables(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
