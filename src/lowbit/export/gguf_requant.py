"""GGUF export: float matrices and inexact weights quantized to ggml types by lowbit.core.

Two uses, both rounding with :mod:`lowbit.core` (never ``gguf.quants``):

* :func:`quantize_matrix`: a float matrix (the token embedding, an unquantized output
  head, a requantized weight) to a ggml type with
  :func:`lowbit.core.ggml.quantize_fields` and its data-free weighting (llama.cpp's
  weighting without an imatrix, as llama-quantize treats ``token_embd``);
* :func:`nearest`: a lowbit int weight with no exact ggml type (fp32/bf16 scales, groups
  ggml blocks cannot hold) to the smallest ggml type that keeps its codes. Candidates, by
  bits per weight: the legacy types with the weight's own scales rounded to float16 (Q4_0
  for int2..int4 symmetric, Q5_0 for int5, Q4_1/Q5_1 for affine 4/5-bit ones with offset
  ``d*(qmin - zero_point)`` in float16, Q8_0 for up to 8 bits, ``codes - zero_point`` for
  affine ones), rounded to nearest at those fixed scales by lowbit.core; and every ggml
  type with at least as many element bits searched by ``quantize_fields``. The first size
  whose result keeps every code (``|w_file - w| < scale / 2`` element by element: lowbit's
  scales would quantize the file's weight back to the same codes) wins, the smaller RMS
  change among types of that size; when none does, the candidate with the least RMS change.
  The caller reports each layer's type and max/RMS change.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings
from collections import Counter

import numpy as np
import torch

from lowbit.core import QTensor
from lowbit.errors import ConfigError
from lowbit.export.gguf_types import NotExact, _full, _per_block, gguf_spec_type, pack_fields

FLOAT_TYPES = ("f32", "f16", "bf16")
#: ggml types lowbit.core quantizes a float matrix to (token_embd, output, requantizing)
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
               "q6_k", "iq4_nl", "iq4_xs")
_SAMPLE_ROWS = 8  # rows a searched candidate must keep the codes of before a full search
#: element bits of each ggml type (the resolution of its grid), for picking candidates
ELEMENT_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4,
                "IQ4_XS": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}


def ggml_types() -> tuple[str, ...]:
    """ggml type names lowbit writes (``lowbit.formats.ggml_blocks.GGML_BLOCKS``)."""
    from lowbit.formats.ggml_blocks import GGML_BLOCKS

    return tuple(GGML_BLOCKS)


def bits_per_weight(kind: str) -> float:
    """Bits per element of ggml type ``kind`` in the file (``type_size * 8 / block``)."""
    from lowbit.formats.ggml_blocks import GGML_BLOCKS

    b = GGML_BLOCKS[kind]
    return b.type_size * 8 / b.super


def quantize_matrix(w: torch.Tensor, kind: str, gname: str,
                    rows: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """``w`` (float ``[O, I]``) as ggml type ``kind``: ``(bytes uint8 [O, I/super*size],
    dequantized float32 [O, I])`` (rows reordered by ``rows``, bytes and values alike),
    rounded by :func:`lowbit.core.ggml.quantize_fields` with data-free weighting.
    ConfigError naming ``gname`` when ``I`` is not a multiple of the type's block."""
    from lowbit.core.ggml import quantize_fields
    from lowbit.formats import ggml_blocks

    b = ggml_blocks.block(kind)
    if w.ndim != 2 or w.shape[-1] % b.super:
        raise ConfigError(f"GGUF export: {gname} has {w.shape[-1]} columns, not a multiple "
                          f"of {b.super}, so it cannot be {kind}; choose a type with "
                          f"{'32-' if b.super > 32 else ''}blocks that fit, f16 or f32")
    fields = quantize_fields(w.detach().float().cpu(), kind, importance=None)
    back = ggml_blocks.dequantize(kind, fields)
    if rows is not None:
        back = back[rows]
    return pack_fields(kind, fields, rows), back


@dataclass
class Requantized:
    """One weight written in a type other than its spec's: ``kind``, ``arr`` (ggml bytes),
    ``max_change``/``rms_change`` (file vs lowbit's fake-quantized weight, absolute),
    ``codes_kept`` (every element within half a source step; None where the source has
    no lowbit grid to compare with, e.g. a ggml type already), ``how``."""

    kind: str
    arr: np.ndarray
    max_change: float
    rms_change: float
    codes_kept: bool | None
    how: str


def _fixed_candidates(qt: QTensor, w: torch.Tensor):
    """``[(kind, run)]``: ``run()`` gives ``(kind, fields, dequantized, how)`` of a legacy
    type at the weight's own scales (and offsets) rounded to float16, one per block of 32,
    rounded to nearest by :func:`lowbit.core.ggml.fields_from_scales`."""
    from lowbit.core.ggml import fields_from_scales
    from lowbit.formats import ggml_blocks

    fmt = qt.spec.element_format
    if fmt.kind != "int" or qt.spec.block_format is not None or len(qt.shape) != 2 or \
            qt.shape[1] % 32:
        return []
    try:
        d = _per_block(qt, qt.scale.cpu(), "scale")
        zp = None if qt.zero_point is None else \
            _per_block(qt, qt.zero_point.cpu(), "zero-point")
    except NotExact:
        return []
    d16 = d.to(torch.float16).float()
    if not bool(torch.isfinite(d16).all()) or bool(((d16 == 0) & (d != 0)).any()):
        return []
    sym = qt.spec.symmetric and fmt.qmin < 0 and zp is None
    tries = []
    if sym:
        tries += [(k, None) for k, b in (("Q4_0", 4), ("Q5_0", 5)) if fmt.bits <= b]
    elif fmt.bits <= 5:  # x = d*(q - qmin) + d*(qmin - zp): Q4_1/Q5_1, offset -m
        m16 = (d * (fmt.qmin - (zp if zp is not None else 0))).to(torch.float16).float()
        if bool(torch.isfinite(m16).all()):
            tries += [(k, -m16) for k, b in (("Q4_1", 4), ("Q5_1", 5)) if fmt.bits <= b]
    if sym or fmt.bits <= 7:  # q - zp fits int8
        tries.append(("Q8_0", None))
    def make(kind, off):
        def run():
            f = fields_from_scales(w, kind, d16, off)
            return (kind, f, ggml_blocks.dequantize(kind, f),
                    f"{kind} at its own scales rounded to float16")
        return run

    return [(kind, make(kind, off)) for kind, off in tries]


def nearest(qt: QTensor, w: torch.Tensor, rows: torch.Tensor | None, gname: str,
            only: str | None = None) -> Requantized:
    """The smallest ggml type keeping the codes of ``qt`` (see the module doc). ``w``: the
    fake-quantized weight ``[O, I]`` (rows in lowbit's order); ``rows``: the file's row
    order (llama.cpp's q/k permutation) applied to the bytes; ``only``: consider this ggml
    type alone (experts stacked in one tensor share a type)."""
    from lowbit.core.ggml import quantize_fields
    from lowbit.formats import ggml_blocks

    w = w.detach().float().cpu()
    src = gguf_spec_type(qt.spec)
    step = None
    fixed = []
    if src is None:
        src_bits = qt.spec.element_format.bits
        if qt.spec.block_format is None:
            step = _full(qt, qt.scale.cpu()).abs().reshape(w.shape)
        fixed = list(_fixed_candidates(qt, w))
    searched = [k for k, bits in ELEMENT_BITS.items()
                if w.shape[1] % ggml_blocks.block(k).super == 0 and k not in
                {c[0] for c in fixed} and (bits >= src_bits if src is None else k == "Q8_0")]
    if only is not None:
        fixed = [c for c in fixed if c[0] == only]
        searched = [] if fixed else [only]
    if not fixed and not searched:
        raise ConfigError(f"GGUF export: {gname} ({qt.spec.short()}, {w.shape[1]} columns) "
                          "fits no ggml type lowbit writes")

    def score(kind, fields, back, how, x=w, st=step):
        diff = (back - x).abs()
        kept = bool((diff < st / 2).all()) if st is not None else False
        return (kind, fields, float(diff.max()), float(diff.pow(2).mean().sqrt()), kept, how)

    results = []
    for _, run in sorted(fixed, key=lambda c: bits_per_weight(c[0])):  # rounding only
        results.append(score(*run()))
        if results[-1][4]:
            break  # larger fixed types keep the codes too
    keep_bpw = min((bits_per_weight(r[0]) for r in results if r[4]), default=float("inf"))
    for kind in sorted(searched, key=lambda k: (bits_per_weight(k), k)):
        if bits_per_weight(kind) >= keep_bpw:
            break  # a type no larger already keeps the codes (at its own scales: ~exact)
        if step is not None and w.shape[0] > _SAMPLE_ROWS:  # screen on a few rows first
            f = quantize_fields(w[:_SAMPLE_ROWS], kind, importance=None)
            if not score(kind, f, ggml_blocks.dequantize(kind, f), "", w[:_SAMPLE_ROWS],
                         step[:_SAMPLE_ROWS])[4]:
                continue
        f = quantize_fields(w, kind, importance=None)
        r = score(kind, f, ggml_blocks.dequantize(kind, f), f"{kind} searched by lowbit.core")
        results.append(r)
        if r[4]:
            keep_bpw = bits_per_weight(kind)
    if not results:  # every searched type failed its screen: the least-change one in full
        kind = max(searched, key=lambda k: (ELEMENT_BITS[k], -bits_per_weight(k)))
        f = quantize_fields(w, kind, importance=None)
        results.append(score(kind, f, ggml_blocks.dequantize(kind, f),
                             f"{kind} searched by lowbit.core"))
    kept = [r for r in results if r[4]]
    kind, fields, mx, rms, ok, how = min(kept, key=lambda r: (bits_per_weight(r[0]), r[3])) \
        if kept else min(results, key=lambda r: r[3])
    return Requantized(kind, pack_fields(kind, fields, rows), mx, rms,
                       ok if step is not None else None, how)


def type_option(value: str | None, what: str, extra: str = "") -> str | None:
    """A tensor type option (``"q6_k"``, ``"Q6_K"``, ``"f16"``) in lower case; ConfigError
    naming ``what`` and the accepted values otherwise."""
    if value is None:
        return None
    v = str(value).lower()
    if v not in FLOAT_TYPES + QUANT_TYPES:
        raise ConfigError(f"{what} {value!r}; expected one of: {extra}"
                          f"{', '.join(FLOAT_TYPES + QUANT_TYPES)}")
    return v


def mix_types(model) -> tuple[str | None, str | None, str | None]:
    """``(token_embd type, output type, ftype)`` of the GGUF mix ``model`` was quantized
    with: the plan lowbit.quantize kept in ``model.lowbit_report.gguf_mix`` (see
    :func:`lowbit.adapters.gguf_mix.plan`), else the recipe's ``gguf_mix``
    (:class:`lowbit.config.recipe.GgufMix`) planned again; Nones without a mix."""
    low = (lambda t: None if t is None else str(t).lower())
    plan = getattr(getattr(model, "lowbit_report", None), "gguf_mix", None)
    if isinstance(plan, dict) and plan.get("ftype"):
        return low(plan.get("token_embd")), low(plan.get("output")), low(plan["ftype"])
    mix = getattr(getattr(model, "lowbit_recipe", None), "gguf_mix", None)
    if mix is None:
        return None, None, None
    from lowbit.adapters import gguf_mix

    p = gguf_mix.plan(model, mix.type, output_type=mix.output_type,
                      embedding_type=mix.embedding_type, pure=mix.pure,
                      has_imatrix=bool(mix.imatrix))
    return low(p.token_embd), low(p.output), low(p.ftype)


def warn_requantized(requantized: list, requantize_type: str) -> None:
    """One warning: how many layers were requantized, to which types, and per layer the
    type and the max/RMS change of the weight (file vs lowbit's fake-quantized weight)."""
    kinds = Counter(r[1] for r in requantized)
    worst = max(requantized, key=lambda r: r[2])
    lost = [r[0] for r in requantized if r[4] is False]
    how = "the nearest GGUF type" if requantize_type == "nearest" else \
        requantize_type.upper()
    lines = [f"GGUF export requantized {len(requantized)} layers to {how} from their "
             f"fake-quantized weights (no exact GGUF type): "
             + ", ".join(f"{n} x {k}" for k, n in kinds.most_common())
             + f"; largest weight change {worst[2]:.3g} in {worst[0]}"
             + (f"; {len(lost)} layers do not keep every code (e.g. {lost[0]})" if lost
                else "")]
    lines += [f"  {r[0]}: {r[1]}, max change {r[2]:.3g}, rms change {r[3]:.3g}"
              for r in requantized]
    warnings.warn("\n".join(lines), stacklevel=4)


__all__ = ["ELEMENT_BITS", "FLOAT_TYPES", "QUANT_TYPES", "Requantized", "bits_per_weight",
           "ggml_types", "mix_types", "nearest", "quantize_matrix", "type_option",
           "warn_requantized"]
