"""``lowbit export``: write a quantized checkpoint in another format (no recalibration)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli import app, console, fail, one_line_errors

ALLOW_REQUANTIZE = ("gguf: write weights whose scales ggml cannot hold exactly in the "
                    "nearest ggml type that keeps their codes (each layer's type and change "
                    "listed in a warning) instead of stopping with an error")
NO_VOCAB = ("gguf: write no vocabulary (for a tokenizer that is not byte-level BPE; "
            "llama.cpp then runs on token ids)")


EMBEDDING_TYPE = ("gguf: type of the token embedding (llama-quantize's --token-embedding-type): "
                  "f32, f16, bf16 or a ggml type (q8_0, q6_k, q4_k...); default: the GGUF "
                  "mix's rule (gguf-* presets), else the float type")
OUTPUT_TYPE = ("gguf: type of the output layer (llama-quantize's --output-tensor-type), as "
               "--embedding-type; a tied embedding takes it too")


def gguf_options(format: str, allow_requantize: bool, no_vocab: bool,
                 embedding_type: "str | None" = None, output_type: "str | None" = None) -> dict:
    """The exporter options of --allow-requantize, --no-vocab, --embedding-type and
    --output-type (an error unless gguf)."""
    given = [f for f, on in (("--allow-requantize", allow_requantize),
                             ("--no-vocab", no_vocab),
                             ("--embedding-type", embedding_type is not None),
                             ("--output-type", output_type is not None)) if on]
    if given and format != "gguf":
        fail(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} only for --format "
             f"gguf, not {format}")
    opts: dict = {}
    if allow_requantize:
        opts["allow_requantize"] = True
    if no_vocab:
        opts["tokenizer"] = None
    if embedding_type is not None:
        opts["embedding_type"] = embedding_type.lower()
    if output_type is not None:
        opts["output_type"] = output_type.lower()
    return opts


def export_options(model, tok, format: str, seq_len: int = 16) -> dict:
    """Exporter options the command line gives for ``format`` (before gguf_options).

    ONNX traces the model (and saves the tokenizer beside model.onnx): it gets an example
    input_ids of shape [2, min(seq_len, 16)] (token
    ids of a short text when a tokenizer is there, else zeros; batch 2, since torch.export
    fixes an axis it sees at size 1), use_cache=False, and the batch and sequence axes marked
    dynamic, so the file runs at any batch (<= 64) and length (<= 4096).
    """
    import torch

    if format == "onnx":
        n = max(2, min(seq_len, 16))
        ids = None
        if tok is not None:
            try:
                ids = tok("The quick brown fox jumps over the lazy dog. " * 4,
                          return_tensors="pt")["input_ids"][:, :n]
            except Exception:  # a tokenizer that cannot encode plain text: zeros do as well
                ids = None
        if ids is None or ids.shape[1] < 2:
            ids = torch.zeros(1, n, dtype=torch.long)
        ids = ids.repeat(2, 1)
        from torch.export import Dim

        axes = {0: Dim("batch", max=64), 1: Dim("seq", max=4096)}
        return {"example_inputs": (ids,), "example_kwargs": {"use_cache": False},
                "tokenizer": tok,
                "input_names": ["input_ids"], "output_names": ["logits"],
                "dynamic_shapes": {"input_ids": axes, "use_cache": None}}
    if format in ("lowbit", "compressed-tensors", "gguf"):
        return {"tokenizer": tok}
    return {}


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Argument(..., help="a lowbit checkpoint folder (from lowbit "
                                     "quantize) or any model lowbit quantize reads"),
    format: str = typer.Option(..., "--format", "-f",
                               help="lowbit | compressed-tensors | gguf | onnx"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    force: bool = typer.Option(False, help="replace --out if it exists"),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help=ALLOW_REQUANTIZE),
    no_vocab: bool = typer.Option(False, "--no-vocab", help=NO_VOCAB),
    embedding_type: Optional[str] = typer.Option(None, "--embedding-type",
                                                 "--token-embedding-type",
                                                 help=EMBEDDING_TYPE),
    output_type: Optional[str] = typer.Option(None, "--output-type", "--output-tensor-type",
                                              help=OUTPUT_TYPE),
) -> None:
    """Re-export a quantized checkpoint in another format: the stored codes and scales are
    written as they are, nothing is recalibrated (exit 0 ok, 2 bad input, 1 failure)."""
    from lowbit.cli.quantize_cmds import _check_model_path, _load
    from lowbit.export import exporter_names, save

    _check_model_path(checkpoint)
    if format not in exporter_names():
        fail(f"unknown --format {format!r}; expected one of: {', '.join(exporter_names())}")
    gguf_opts = gguf_options(format, allow_requantize, no_vocab, embedding_type, output_type)
    if out.exists() and not force:
        fail(f"output folder {out} exists; pass --force to replace it")
    if out.resolve() == Path(checkpoint).resolve():
        fail(f"--out {out} is the checkpoint itself; write to another folder")
    t0 = time.perf_counter()
    with one_line_errors("export"):
        m, tok = _load(checkpoint)
        with console.status(f"writing {format} checkpoint to {out}"):
            opts = {**export_options(m, tok, format), **gguf_opts}
            save(m, out, format=format, overwrite=force, **opts)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    console.print(f"wrote {out} ({format}, {size / 1e6:.1f} MB) in "
                  f"{time.perf_counter() - t0:.1f} s")
