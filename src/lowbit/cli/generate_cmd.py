"""``lowbit generate``: greedy text from a (quantized) model with real low-bit kernels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli import app, console, fail, one_line_errors


@app.command("generate")
def generate_cmd(
    model: str = typer.Argument(..., help="lowbit checkpoint, transformers folder, .gguf "
                                "file or 'smollm2-135m'"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the tokenizer's chat "
                              "template (instruct models)"),
    dtype: str = typer.Option("bf16", "--dtype", help="dtype of the unquantized parts: "
                              "bf16 or fp32"),
    packed: bool = typer.Option(True, "--packed/--fake", help="real low-bit kernels "
                                "(lowbit.runtime.convert) or the fake-quantized model"),
    loop: str = typer.Option("lowbit", "--loop", help="lowbit (FastDecoder: the families in "
                             "lowbit.runtime.decode.SUPPORTED) or hf (transformers' generate)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="CPU threads (default: torch's)"),
    compile: bool = typer.Option(False, "--compile", help="--loop lowbit: capture the "
                                 "decode step with torch.compile (needs a C compiler; the "
                                 "first run builds it, minutes; falls back to eager with a "
                                 "warning)"),
) -> None:
    """Continue --prompt greedily and print the text and the decode speed (tokens/s).

    A lowbit checkpoint runs on its packed kernels (int8/int4 weight-only, W8A8 ...);
    --loop lowbit uses lowbit's FastDecoder (Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3,
    Granite, OLMo-2: lowbit.runtime.decode.SUPPORTED), --loop hf uses transformers' generate.
    """
    import torch

    import lowbit.runtime as rt
    from lowbit.data import load_model
    from lowbit.nn.modules import QuantLinear

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        fail(f"--dtype {dtype!r}; expected one of: {', '.join(dtypes)}")
    if loop not in ("lowbit", "hf"):
        fail(f"--loop {loop!r}; expected lowbit or hf")
    if compile and loop != "lowbit":
        fail("--compile captures lowbit's decode loop; use it with --loop lowbit")
    if not (Path(model).exists() or model in ("smollm2-135m", "default")):
        fail(f"model {model!r} does not exist (a folder, a .gguf file or smollm2-135m)")
    if threads:
        torch.set_num_threads(threads)
    with one_line_errors("generation"):
        with console.status(f"loading {model}"):
            m, tok = load_model(model)
            quantized = any(isinstance(x, QuantLinear) for x in m.modules())
            kernels = rt.convert(m) if packed and quantized else {}
            m = m.to(dtypes[dtype]).eval()
        if chat:
            if not getattr(tok, "chat_template", None):
                fail("--chat: the tokenizer has no chat template; drop --chat")
            text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        ids = tok(text, return_tensors="pt").input_ids
        if ids.numel() == 0:
            fail("--prompt is empty after tokenization; give some text")
        eos = tok.eos_token_id
        with torch.inference_mode():
            t0 = time.perf_counter()
            if loop == "lowbit":
                dec = rt.FastDecoder(m, compile=compile)
                build = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = dec.generate(ids, max_new_tokens, eos_token_id=eos)
            else:
                build = 0.0
                out = m.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=eos if eos is not None else 0)
            dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    console.print(tok.decode(new, skip_special_tokens=True), highlight=False, markup=False)
    kern = ", ".join(f"{k} x{v}" for k, v in sorted(kernels.items())) or "none (float)"
    console.print(f"[dim]{len(new)} new tokens after {ids.shape[1]} in {dt:.2f} s: "
                  f"{len(new) / dt:.1f} tokens/s ({loop} loop"
                  f"{', compiled: its build included' if compile else ''}, prompt included; decoder "
                  f"built in {build:.2f} s); kernels: {kern}[/]", highlight=False)
