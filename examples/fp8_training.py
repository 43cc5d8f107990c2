"""FP8 training with delayed scaling: a small Llama trained from scratch on byte-level text.

    python examples/fp8_training.py                    # 100 steps, FP8 only (~1-2 min)
    python examples/fp8_training.py --compare          # also FP32, same seed and batches
    python examples/fp8_training.py --steps 1000 --hidden 512 --layers 8 --recipe e4m3

Every ``nn.Linear`` but the LM head runs its three GEMMs on FP8 tensors inside
``lowbit.training.fp8_autocast``: E4M3 activations and weights, E5M2 gradients ("hybrid"),
one scale per tensor from the max of its last 1024 amax values (delayed scaling). On a CPU
the FP8 GEMMs are emulated exactly in float32; on an FP8 GPU they use ``torch._scaled_mm``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # kinder to a busy CPU

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lowbit.data import default_demo_text, read_text, split_tokens, windows_from_ids  # noqa: E402
from lowbit.training import Fp8Recipe, fp8_autocast, fp8_layers  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pydocs_tut_ref.txt"


def train(model, batches, eval_x, recipe, lr, log):
    """Train ``model`` on ``batches`` (FP8 when ``recipe`` is set); returns the eval loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0 = time.perf_counter()
    for step, x in enumerate(batches):
        if recipe is not None:
            with fp8_autocast(model, recipe):
                loss = model(x, labels=x).loss
        else:
            loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()  # may run outside the block: the FP8 backward was recorded inside
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == len(batches) - 1:
            log(f"step {step + 1}/{len(batches)} loss {loss.item():.4f} "
                f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    model.eval()
    ctx = fp8_autocast(model, recipe) if recipe is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return sum(model(e[None], labels=e[None]).loss.item() for e in eval_x) / len(eval_x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(SHARED) if SHARED.exists() else None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--recipe", default="hybrid", choices=["hybrid", "e4m3"])
    ap.add_argument("--scaling", default="delayed", choices=["delayed", "current"])
    ap.add_argument("--history", type=int, default=1024, help="amax history length")
    ap.add_argument("--compare", action="store_true", help="also train in FP32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    text = read_text(args.text) if args.text else default_demo_text()
    ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    train_ids, eval_ids = split_tokens(ids)  # byte-level tokens: vocabulary 256
    batches = list(windows_from_ids(train_ids, args.steps * args.batch, args.seq_len,
                                    seed=0).split(args.batch))
    eval_x = eval_ids[:16 * args.seq_len].reshape(-1, args.seq_len)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=args.layers, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=args.seq_len)
    base = LlamaForCausalLM(cfg)
    recipe = Fp8Recipe(format=args.recipe, scaling=args.scaling,
                       amax_history_len=args.history)

    model = copy.deepcopy(base)
    fp8_loss = train(model, batches, eval_x, recipe, args.lr, lambda s: print("fp8 ", s))
    print(f"FP8 ({args.recipe}, {args.scaling} scaling): held-out loss {fp8_loss:.4f}")
    name, layer = next(fp8_layers(model))
    meta = layer.fp8_meta
    print(f"{name}: {int(meta.input.steps)} steps recorded; scale input "
          f"{float(meta.input.scale):.4g}, weight {float(meta.weight.scale):.4g}, "
          f"grad {float(meta.grad_output.scale):.4g}")
    if args.compare:
        ref = train(copy.deepcopy(base), batches, eval_x, None, args.lr,
                    lambda s: print("fp32", s))
        print(f"FP32: held-out loss {ref:.4f}; FP8/FP32 = {fp8_loss / ref:.4f}")


if __name__ == "__main__":
    main()
