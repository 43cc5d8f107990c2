"""Quantization-aware training with distillation (QAD): PTQ, then fine-tune through the
fake quantizers, then export as after PTQ.

    python examples/qat.py                         # SmolLM2-135M, W4A8, 20 steps (~3-5 min)
    python examples/qat.py --steps 200 --seq-len 256 --windows 32 --scales learnable

Steps: load the model -> ``lowbit.training.prepare_qat`` (runs ``lowbit.quantize`` with the
recipe and calibration data, then makes the quantizers trainable) -> a plain PyTorch loop
minimising KL(teacher || student) against the full-precision model -> ``finalize_qat`` ->
``lowbit.save`` / ``lowbit.load``. Perplexity on held-out text before and after.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # kinder to a busy CPU

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data import (default_demo_text, forward_loop_from_batches, load_model,  # noqa: E402
                         read_text, split_tokens, tokenize, windows_from_ids)
from lowbit.eval import perplexity  # noqa: E402
from lowbit.training import distill_loss, finalize_qat, param_groups, prepare_qat  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen_pp.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="lowbit.data.load_model name/path")
    ap.add_argument("--text", default=str(SHARED) if SHARED.exists() else None,
                    help="training/eval text (default: austen_pp.txt, else stdlib docstrings)")
    ap.add_argument("--recipe", default="w4a8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--scales", default="frozen", choices=["frozen", "learnable", "absmax"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--out", default=None,
                    help="folder for the exported checkpoint (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher, tok = load_model(args.model)
    text = read_text(args.text) if args.text else default_demo_text()
    train_ids, held_out = split_tokens(tokenize(tok, text))  # first 80% / last 20%

    def ppl(m):
        return perplexity(m, held_out, seq_len=512, n_windows=args.windows)["ppl"]

    print(f"FP32 ppl {ppl(teacher):.3f}  ({args.windows} held-out windows x 512)")

    # 1. PTQ + trainable quantizers: the prepared model computes exactly what PTQ computes
    student = copy.deepcopy(teacher)
    calib = windows_from_ids(train_ids, args.calib_samples, 512, seed=0)
    prepare_qat(student, args.recipe, forward_loop_from_batches(calib), scales=args.scales,
                group_size=args.group_size)
    print(f"PTQ ({args.recipe}) ppl {ppl(student):.3f}; quantizers: "
          + ", ".join(f"{k} {len(v)}" for k, v in student.lowbit_qat.items() if v))

    # 2. QAD: a plain loop; the learnable scales (if any) are ordinary parameters
    opt = torch.optim.AdamW(param_groups(student, args.lr), weight_decay=0.0)
    batches = windows_from_ids(train_ids, args.steps * args.batch, args.seq_len, seed=1)
    student.train()
    t0 = time.perf_counter()
    for step, x in enumerate(batches.split(args.batch)):
        with torch.no_grad():
            t_logits = teacher(x).logits
        loss = distill_loss(student(x).logits, t_logits)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}  KL {loss.item():.4f}  "
                  f"({(time.perf_counter() - t0) / (step + 1):.1f} s/step)", flush=True)
    student.eval()

    # 3. learned state -> ordinary quantizer buffers; export exactly as after PTQ
    finalize_qat(student)
    print(f"QAT ppl {ppl(student):.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "qat-checkpoint")
        lowbit.save(student, out, tokenizer=tok, overwrite=True)
        back = lowbit.load(out)
        x = held_out[:64][None]
        with torch.no_grad():
            same = torch.equal(back(x).logits, student(x).logits)
        print(f"saved {out if args.out else 'a checkpoint'}; reloaded model gives the same "
              f"logits: {same}")


if __name__ == "__main__":
    main()
