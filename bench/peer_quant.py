"""Quantize the real model with a peer toolkit, in the peer's own virtual environment.

Run by ``bench/algorithms.py`` for its ``peer:*`` rows with the interpreter of a venv that
holds the peer (``--peer-python`` or ``LOWBIT_PEER_PYTHON``; see ../shared/PEERS.md for
installing one: the peers pin other versions of transformers and compressed-tensors than
lowbit, so they never share its venv). lowbit is not imported here; the model, the
calibration token ids and the output are plain files, so the peer sees exactly lowbit's
calibration windows and lowbit evaluates the peer's weights with its own perplexity code.

    python bench/peer_quant.py --method llmc-gptq --model DIR --calib ids.safetensors \
        --group-size 64 --threads 1 --out weights.safetensors --report report.json
    python bench/peer_quant.py --method modelopt-int8-sq --model DIR --calib ids.safetensors \
        --eval windows.safetensors --threads 1 --report report.json

Methods: ``llmc-gptq`` (llm-compressor's GPTQModifier, W4A16 symmetric int4 groups),
``llmc-rtn`` (its QuantizationModifier, the same scheme without GPTQ), ``llmc-awq`` (its
AWQ transform then W4A16 asymmetric groups, as PEERS.md measured it), ``modelopt-int4-awq``
(Model Optimizer's INT4_AWQ_CFG with blocks of ``--group-size``). The output holds every
parameter of the model (float32; AWQ changes the norms too) with the quantized linears'
weights replaced by their dense fake-quantized values; the
report the quantization wall time (seconds, the peer's call only). Exit 3 when the peer is
not installed.

Methods that quantize activations too cannot be handed over as dense weights:
``modelopt-int8-sq`` (Model Optimizer's INT8_SMOOTHQUANT_CFG as it ships: per-channel int8
weights, static per-tensor int8 inputs, SmoothQuant alpha 1.0) and ``modelopt-int8``
(INT8_DEFAULT_CFG, the same W8A8 without SmoothQuant). For them the peer computes the
perplexity itself, here, on the token-id windows of ``--eval`` (a safetensors file of
``[n, seq_len]`` windows, one tensor per text, e.g. ``austen`` and ``offdomain``), with
lowbit.eval.perplexity's definition: every window scores its ``seq_len - 1`` next-token
predictions, log-softmax in float32, NLL sums in float64, ppl = exp(total NLL / scored
tokens). It evaluates the unquantized FP32 model on the same windows first, so the caller can
check that this evaluation reproduces lowbit's FP32 numbers. No ``--out`` for them; the
report holds ``ppl``, ``fp32_ppl``, ``nll``, ``fp32_nll`` and ``tokens`` (each ``{text:
value}``) as well.

The ``llmc-<transform>-<quantizer>-<scheme>`` methods (bench/rotations.py's peer rows) are
evaluated here the same way: llm-compressor's QuIPModifier (``quip``), SpinQuantModifier
(``spinquant``), SmoothQuantModifier (``sq``) or nothing (``none``), then GPTQModifier
(``gptq``) or QuantizationModifier (``rtn``) with the scheme ``nvfp4``, ``mxfp4``, ``w4a8``,
``w4a16`` or ``w8a8`` (see :func:`llmc_scheme` and :func:`llmc_recipe` for what each is and
where it differs from lowbit's preset), e.g.

    python bench/peer_quant.py --method llmc-quip-gptq-nvfp4 --model DIR --calib ids.safetensors \
        --eval windows.safetensors --group-size 64 --threads 2 --report report.json

Their report adds ``quant_rss_mb`` (peak RSS up to the end of quantization, MB; ``peak_rss_mb``
includes both evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

# evaluated here (activations are quantized): Model Optimizer config name of each
EVAL_METHODS = {"modelopt-int8-sq": "INT8_SMOOTHQUANT_CFG", "modelopt-int8": "INT8_DEFAULT_CFG"}
# llm-compressor with a transform (rotation or smoothing) in front of GPTQ/RTN, evaluated here
# too: ``llmc-<transform>-<quantizer>-<scheme>`` (bench/rotations.py's peer rows)
LLMC_TRANSFORMS = ("none", "quip", "spinquant", "sq")
LLMC_QUANTIZERS = ("gptq", "rtn")
LLMC_SCHEMES = ("nvfp4", "mxfp4", "w4a8", "w4a16", "w8a8")
LLMC_EVAL_METHODS = tuple(f"llmc-{t}-{q}-{s}" for t in LLMC_TRANSFORMS for q in LLMC_QUANTIZERS
                          for s in LLMC_SCHEMES)
METHODS = ("llmc-gptq", "llmc-rtn", "llmc-awq", "modelopt-int4-awq", *EVAL_METHODS,
           *LLMC_EVAL_METHODS)


def evaluated_here(method: str) -> bool:
    """Whether ``method`` quantizes activations or applies online transforms, so that the
    peer computes the perplexity itself (``--eval``) instead of handing dense weights over."""
    return method in EVAL_METHODS or method in LLMC_EVAL_METHODS


def parse_llmc_method(method: str) -> tuple[str, str, str]:
    """``llmc-<transform>-<quantizer>-<scheme>`` -> ``(transform, quantizer, scheme)``;
    ValueError naming the method and the accepted parts otherwise."""
    parts = method.split("-")
    if (len(parts) != 4 or parts[0] != "llmc" or parts[1] not in LLMC_TRANSFORMS
            or parts[2] not in LLMC_QUANTIZERS or parts[3] not in LLMC_SCHEMES):
        raise ValueError(f"{method!r} is not llmc-<transform>-<quantizer>-<scheme> with transform "
                         f"in {LLMC_TRANSFORMS}, quantizer in {LLMC_QUANTIZERS}, scheme in "
                         f"{LLMC_SCHEMES}")
    return parts[1], parts[2], parts[3]


def llmc_scheme(scheme: str, group_size: int):
    """The compressed-tensors QuantizationScheme of ``scheme`` for every Linear. ``nvfp4``,
    ``mxfp4`` and ``w8a8`` are the peer's presets (``NVFP4``, ``MXFP4``, ``W8A8``: per-channel
    int8 weights, dynamic per-token int8 inputs) as they ship; ``w4a16`` is symmetric int4
    weights in groups of ``group_size``; ``w4a8`` is built to match lowbit's w4a8 preset: int4
    symmetric groups of ``group_size`` and FP8 E4M3 inputs with one static per-tensor scale from
    the calibration maximum (``static_minmax``; the peer's own W4AFP8 preset uses dynamic
    per-token FP8 inputs and groups of 128)."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme,
                                                 preset_name_to_scheme)

    if scheme in ("nvfp4", "mxfp4", "w8a8"):
        return preset_name_to_scheme(scheme.upper(), ["Linear"])
    w = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                         group_size=group_size)
    if scheme == "w4a16":
        return QuantizationScheme(targets=["Linear"], weights=w)
    a = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor",
                         dynamic=False, observer="static_minmax")
    return QuantizationScheme(targets=["Linear"], weights=w, input_activations=a)


# the block of the rotations (MR-GPTQ: the quantization group; QuIP's ``transform_block_size``)
LLMC_BLOCK = {"nvfp4": 16, "mxfp4": 32}


def llmc_recipe(method: str, group_size: int, transform_block: int | None) -> list:
    """The llm-compressor modifiers of an ``llmc-<transform>-<quantizer>-<scheme>`` method.

    ``quip``: QuIPModifier with the input-side rotation only (``rotations=["v"]``, as its
    docstring recommends), ``random-hadamard`` (the Hadamard that exists for 576 = 36 * 16 and
    1536 = 12 * 128), in blocks of ``transform_block`` (None: the scheme's group for NVFP4/MXFP4,
    the MR-GPTQ choice, else the layer's whole width); ``spinquant``: SpinQuantModifier with R1,
    R2 and R4 (QuaRot's set, as lowbit's w4a8-rotated), ``random-hadamard`` (its default ``hadamard`` needs
    powers of two: 576 is not), blocks of ``transform_block`` (None: whole width); ``sq``:
    SmoothQuantModifier(smoothing_strength=0.8), as llm-compressor's W8A8 int8 example; then
    GPTQModifier (``gptq``) or QuantizationModifier (``rtn``) with the scheme, lm_head
    excluded."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    transform, quantizer, scheme = parse_llmc_method(method)
    recipe = []
    if transform == "quip":
        from llmcompressor.modifiers.transform import QuIPModifier

        block = transform_block or LLMC_BLOCK.get(scheme)
        recipe.append(QuIPModifier(rotations=["v"], transform_type="random-hadamard",
                                   transform_block_size=block))
    elif transform == "spinquant":
        from llmcompressor.modifiers.transform import SpinQuantModifier

        recipe.append(SpinQuantModifier(rotations=["R1", "R2", "R4"],
                                        transform_type="random-hadamard",
                                        transform_block_size=transform_block))
    elif transform == "sq":
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        recipe.append(SmoothQuantModifier(smoothing_strength=0.8))
    cls = GPTQModifier if quantizer == "gptq" else QuantizationModifier
    recipe.append(cls(config_groups={"group_0": llmc_scheme(scheme, group_size)},
                      ignore=["lm_head"]))
    return recipe


def llmc_quantize_here(model, ids, method: str, group_size: int,
                       transform_block: int | None) -> tuple[int, int, list]:
    """Run llm-compressor's oneshot with :func:`llmc_recipe` on ``ids [n, L]``, leaving the
    model fake-quantized in place (its online transforms attached); returns (linears with
    quantized weights, with quantized inputs, the recipe's modifiers as text)."""
    from datasets import Dataset
    from llmcompressor import oneshot

    recipe = llmc_recipe(method, group_size, transform_block)
    n, seq = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n})
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seq,
            num_calibration_samples=n)
    n_w = n_in = 0
    for _, m in model.named_modules():
        qs = getattr(m, "quantization_scheme", None)
        if qs is None:
            continue
        n_w += qs.weights is not None
        n_in += qs.input_activations is not None
    return n_w, n_in, [repr(r) for r in recipe]


def llmc_cache_weights(model, probe) -> float:
    """Fake-quantize every quantized linear's weight once, in place, and mark the module
    COMPRESSED, so that compressed-tensors' forward skips the weight's fake quantization (as
    it does for a compressed checkpoint) and only quantizes the inputs: the same function, but
    on a CPU its pure-torch FP4 cast of every weight on every forward dominates the evaluation.
    Returns the logits' relative difference on ``probe [1, L]`` before/after (must be ~0)."""
    import torch
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    with torch.no_grad():
        ref = model(probe).logits.float()
        for _, m in model.named_modules():
            qs = getattr(m, "quantization_scheme", None)
            if qs is None or qs.weights is None or not hasattr(m, "weight_scale"):
                continue
            m.weight.data = forward_quantize(m, m.weight.data, "weight", qs.weights)
            m.quantization_status = QuantizationStatus.COMPRESSED
        got = model(probe).logits.float()
    return float((got - ref).norm() / ref.norm())


def llmc(model, ids, method: str, group_size: int):
    """Run llm-compressor's oneshot on ``ids [n, L]``; returns ``{name: dense weight}``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    asym = method == "llmc-awq"  # as PEERS.md measured it: W4A16_ASYM
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=not asym, strategy="group", group_size=group_size))
    if method == "llmc-awq":
        from llmcompressor.modifiers.transform import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        # pinning needs an accelerator; on a CPU-only machine it raises (PEERS.md)
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme},
                                                      ignore=["lm_head"])]
    else:
        cls = GPTQModifier if method == "llmc-gptq" else QuantizationModifier
        recipe = cls(config_groups={"group_0": scheme}, ignore=["lm_head"])
    n, seq = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n})
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seq,
            num_calibration_samples=n)
    # every parameter (AWQ folds its scales into the norms too), quantized weights dense
    out = {k: p.detach().float().contiguous() for k, p in model.named_parameters()
           if "weight_scale" not in k and "zero_point" not in k}
    n = 0
    for name, m in model.named_modules():
        qs = getattr(m, "quantization_scheme", None)
        if qs is None or qs.weights is None or not hasattr(m, "weight_scale"):
            continue
        zp = getattr(m, "weight_zero_point", None)
        w = fake_quantize(m.weight.detach(), m.weight_scale, zp, qs.weights)
        out[f"{name}.weight"] = w.float().contiguous()
        n += 1
    return out, n


def modelopt_int4_awq(model, ids, group_size: int):
    """Model Optimizer's INT4_AWQ_CFG (block ``group_size``); returns (params, n quantized):
    the dense weight of a linear is ``Q(W') * pre_quant_scale`` (AWQ keeps its scale on the
    input side, which folds into the weight's columns exactly)."""
    import copy

    import modelopt.torch.quantization as mtq
    import torch

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for e in cfg["quant_cfg"]:
        if e.get("quantizer_name") == "*weight_quantizer":
            e["cfg"]["block_sizes"] = {-1: group_size, "type": "static"}

    def loop(m):
        for row in ids:
            m(row[None])

    with torch.no_grad():
        mtq.quantize(model, cfg, loop)
    out = {k: p.detach().float().contiguous() for k, p in model.named_parameters()}
    n = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            wq = getattr(m, "weight_quantizer", None)
            if wq is None or not getattr(wq, "is_enabled", False):
                continue
            w = wq(m.weight).float()
            iq = getattr(m, "input_quantizer", None)
            pqs = getattr(iq, "pre_quant_scale", None) if iq is not None else None
            if pqs is not None:
                w = w * pqs.float().reshape(1, -1)
            out[f"{name}.weight"] = w.contiguous()
            n += 1
    return out, n


def perplexity(model, windows) -> tuple[float, float, int]:
    """``(ppl, mean NLL, scored tokens)`` of ``windows [n, L]``, as lowbit.eval.perplexity
    computes it for non-overlapping windows (batch 1): each window scores its ``L - 1``
    next-token predictions; log-softmax of the logits in float32; each window's NLL summed in
    float64 and added up in Python floats; ppl = exp(total / count)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for w in windows:
                x = w.reshape(1, -1).long()
                out = model(x)
                logits = getattr(out, "logits", None)
                if logits is None:
                    logits = out[0] if isinstance(out, (tuple, list)) else out
                logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
                y = x[:, 1:]
                nll = -logp.gather(-1, y[..., None]).squeeze(-1)
                total += float(nll[0].double().sum())
                count += nll[0].numel()
                del logp, nll
    finally:
        model.train(was_training)
    nll = total / count
    return math.exp(nll), nll, count


def modelopt_w8a8(model, ids, method: str):
    """Model Optimizer's W8A8 config for ``method`` (as it ships), calibrated on ``ids [n, L]``
    in place; returns (number of linears with weights quantized, with inputs quantized)."""
    import copy

    import modelopt.torch.quantization as mtq
    import torch

    cfg = copy.deepcopy(getattr(mtq, EVAL_METHODS[method]))

    def loop(m):
        for row in ids:
            m(row[None])

    with torch.no_grad():
        mtq.quantize(model, cfg, loop)
    n_w = n_in = 0
    for _, m in model.named_modules():
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        n_w += bool(wq is not None and getattr(wq, "is_enabled", False))
        n_in += bool(iq is not None and getattr(iq, "is_enabled", False))
    return n_w, n_in


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="dense weights (not for the methods evaluated "
                    "here)")
    ap.add_argument("--eval", type=Path, help="token-id windows to evaluate on (only and "
                    f"required for {', '.join(EVAL_METHODS)})")
    ap.add_argument("--transform-block", type=int, default=None,
                    help="block of the llmc-quip/llmc-spinquant rotations (default: see "
                    "llmc_recipe)")
    ap.add_argument("--report", type=Path, required=True)
    args = ap.parse_args()
    if evaluated_here(args.method) and not args.eval:
        ap.error(f"--method {args.method} quantizes activations: pass --eval windows")
    if not evaluated_here(args.method) and not args.out:
        ap.error(f"--method {args.method} needs --out")
    try:
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        if args.method.startswith("modelopt"):
            import modelopt.torch.quantization  # noqa: F401
        else:
            import llmcompressor  # noqa: F401
    except ImportError as e:
        print(f"peer not installed in {sys.executable}: {e}", file=sys.stderr)
        sys.exit(3)
    torch.set_num_threads(args.threads)
    ids = load_file(str(args.calib))["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if evaluated_here(args.method):
        evaluate_here(args, model, ids)
        return
    t = time.perf_counter()
    if args.method.startswith("modelopt"):
        weights, n_quantized = modelopt_int4_awq(model, ids, args.group_size)
    else:
        weights, n_quantized = llmc(model, ids, args.method, args.group_size)
    seconds = time.perf_counter() - t
    # the dense weights must compute what the peer's quantized model computes
    probe = ids[:1, :64]
    with torch.no_grad():
        ref = model(probe).logits.float()
        dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        params = dict(dense.named_parameters())
        for k, w in weights.items():
            params[k].copy_(w)
        got = dense(probe).logits.float()
    rel = float((got - ref).norm() / ref.norm())
    print(f"{args.method}: dense weights vs the peer's quantized model, logits rel. error "
          f"{rel:.2e}", file=sys.stderr)
    if not n_quantized:
        print(f"{args.method}: no quantized linear found after the peer's call", file=sys.stderr)
        sys.exit(1)
    save_file(weights, str(args.out))
    from importlib.metadata import version

    dist = "nvidia-modelopt" if args.method.startswith("modelopt") else "llmcompressor"
    args.report.write_text(json.dumps({"quant_s": seconds, "layers": n_quantized,
                                       "dense_logits_rel_error": rel,
                                       "peer": f"{dist} {version(dist)}"}))


def evaluate_here(args, model, ids) -> None:
    """FP32 perplexity on ``--eval``'s windows, quantize, perplexity again; write the report."""
    from importlib.metadata import version

    from safetensors.torch import load_file

    windows = load_file(str(args.eval))
    rep = {"fp32_ppl": {}, "fp32_nll": {}, "ppl": {}, "nll": {}, "tokens": {}}
    t = time.perf_counter()
    for name, w in windows.items():
        ppl, nll, n = perplexity(model, w)
        rep["fp32_ppl"][name], rep["fp32_nll"][name], rep["tokens"][name] = ppl, nll, n
        print(f"{args.method}: FP32 {name} ppl {ppl:.4f} ({n} tokens)", file=sys.stderr,
              flush=True)
    fp32_eval_s = time.perf_counter() - t
    t = time.perf_counter()
    if args.method in EVAL_METHODS:
        n_w, n_in = modelopt_w8a8(model, ids, args.method)
        config, dist, wants_inputs = EVAL_METHODS[args.method], "nvidia-modelopt", True
    else:
        n_w, n_in, config = llmc_quantize_here(model, ids, args.method, args.group_size,
                                               args.transform_block)
        t_cache = time.perf_counter()
        rep["weight_cache_rel_error"] = llmc_cache_weights(model, ids[:1, :64])
        print(f"{args.method}: weights fake-quantized once (logits rel. difference "
              f"{rep['weight_cache_rel_error']:.2e})", file=sys.stderr, flush=True)
        if rep["weight_cache_rel_error"] > 1e-5:
            print(f"{args.method}: caching the fake-quantized weights changed the logits",
                  file=sys.stderr)
            sys.exit(1)
        t += time.perf_counter() - t_cache  # quant_s: the peer's call only
        dist, wants_inputs = "llmcompressor", not args.method.endswith("-w4a16")
    seconds = time.perf_counter() - t
    rep["quant_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if not n_w or (wants_inputs and not n_in):
        print(f"{args.method}: {n_w} linears with quantized weights and {n_in} with quantized "
              "inputs after the peer's call (expected both)", file=sys.stderr)
        sys.exit(1)
    t = time.perf_counter()
    for name, w in windows.items():
        ppl, nll, n = perplexity(model, w)
        rep["ppl"][name], rep["nll"][name] = ppl, nll
        print(f"{args.method}: {name} ppl {ppl:.4f}", file=sys.stderr, flush=True)
    eval_s = time.perf_counter() - t
    rep.update(quant_s=seconds, layers=n_w, input_quantized_layers=n_in,
               fp32_eval_s=fp32_eval_s, eval_s=eval_s,
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               config=config, peer=f"{dist} {version(dist)}",
               transformers=version("transformers"))
    args.report.write_text(json.dumps(rep))


if __name__ == "__main__":
    main()
