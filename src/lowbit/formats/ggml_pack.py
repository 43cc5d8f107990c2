"""ggml's byte layout of block-quantized weights: fields <-> bytes, bit for bit.

Fields are those of :mod:`lowbit.formats.ggml_blocks`. One ggml block covers ``super``
columns of a row and takes ``type_size`` bytes; a row of ``I`` columns is ``I/super``
blocks back to back. The layouts are the ``block_*`` structs of ggml-common.h (float16
scales little-endian), as ``gguf.quants`` reads them. Per block, with element index ``e``:

* Q8_0: ``d`` | 32 int8 ``q``.
* Q4_0 / IQ4_NL: ``d`` | 16 bytes ``q[j] | q[j+16] << 4``. Q4_1: ``d, m`` | same.
* Q5_0: ``d`` | ``qh`` (uint32 LE, bit j = bit 4 of ``q[j]``) | low nibbles as Q4_0;
  Q5_1: ``d, m, qh, qs``.
* Q2_K: 16 scale bytes ``sc | mn << 4`` | 64 bytes ``qs`` (``e = 128h + 32s + l`` in bits
  ``2s`` of byte ``32h + l``) | ``d, dmin``.
* Q3_K: 32 bytes ``hmask`` (bit ``b`` of byte ``l`` = bit 2 of ``q[32b + l]``) | 64 bytes
  low 2 bits as Q2_K | 12 bytes of 16 six-bit ``sc`` (byte j<8: low nibbles of ``sc[j]`` and
  ``sc[j+8]`` << 4; byte 8+j: bits 4-5 of ``sc[4s + j]`` at bit ``2s``) | ``d``.
* Q4_K: ``d, dmin`` | 12 bytes of 8 six-bit ``sc``/``mn`` (byte j<4: ``sc[j] | (sc[j+4]>>4)
  << 6``; byte 4+j: same for ``mn``; byte 8+j: ``sc[j+4] & 15 | (mn[j+4] & 15) << 4``) |
  128 bytes ``qs`` (``e = 64c + 32k + l`` in nibble ``k`` of byte ``32c + l``).
* Q5_K: as Q4_K with 32 bytes ``qh`` (bit ``b`` of byte ``l`` = bit 4 of ``q[32b + l]``)
  between scales and ``qs``.
* Q6_K: 128 bytes ``ql`` (``e = 128h + 64k + l`` in nibble ``k`` of byte ``64h + l``) |
  64 bytes ``qh`` (bits 4-5 of ``q[128h + 32s + l]`` at bit ``2s`` of byte ``32h + l``) |
  16 int8 ``sc`` | ``d``.
* IQ4_XS: ``d`` | ``scales_h`` (uint16 LE, bits 4-5 of ``sc[i]`` at bit ``2i``) | 4 bytes
  ``scales_l`` (``sc[2j] & 15 | (sc[2j+1] & 15) << 4``) | 128 bytes (``e = 32j + 16k + l`` in
  nibble ``k`` of byte ``16j + l``).
* NVFP4: 4 ue4m3 scale bytes ``sc`` | 32 bytes (``e = 16s + 8k + l`` in nibble ``k`` of byte
  ``8s + l``).
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import FormatError
from lowbit.formats.ggml_blocks import GgmlBlock, block, check_fields, check_shape

__all__ = ["pack", "unpack"]


def _or_shifted(a: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``[..., k, L]`` -> ``[..., L]``: OR of slice ``i`` shifted left by ``i*bits``."""
    out = np.zeros(a.shape[:-2] + a.shape[-1:], dtype=np.uint8)
    for i in range(a.shape[-2]):  # k <= 8 slices, each vectorized over all blocks
        out |= (a[..., i, :] << np.uint8(i * bits)).astype(np.uint8)
    return out


def _split_shifted(a: np.ndarray, k: int, bits: int) -> np.ndarray:
    """uint8 ``[..., L]`` -> ``[..., k, L]``: slice ``i`` = ``(a >> i*bits) & mask``."""
    sh = (np.arange(k, dtype=np.uint8) * np.uint8(bits)).reshape(k, 1)
    return (a[..., None, :] >> sh) & np.uint8((1 << bits) - 1)


def _half_bytes(t: np.ndarray, n_rows: int, nb: int, per_block: int = 1) -> np.ndarray:
    """float32 holding float16 ``[O, nb*per_block]`` -> uint8 ``[O, nb, 2*per_block]`` LE."""
    return t.astype("<f2").view(np.uint8).reshape(n_rows, nb, 2 * per_block)


def _half_from(b: np.ndarray) -> np.ndarray:
    """uint8 ``[O, nb, 2]`` (float16 LE) -> float32 ``[O, nb]``."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)[..., 0]


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 6-bit ``sc``, ``mn`` ``[O, nb, 8]`` -> 12 scale bytes ``[O, nb, 12]``."""
    lo = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=-1).astype(np.uint8)


def _k_scales_from(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_k_scales` (as gguf's Q4_K.get_scale_min)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _np_u8(t: torch.Tensor) -> np.ndarray:
    """Integer tensor (already range-checked) -> numpy uint8 (int8 two's complement)."""
    t = t.detach().cpu()
    if t.dtype == torch.int8:
        return t.numpy().view(np.uint8)
    return t.to(torch.int16).numpy().astype(np.int16).astype(np.uint8)


def pack(name: str, fields: dict) -> np.ndarray:
    """Pack ``fields`` of ggml type ``name`` into ggml's bytes.

    ``fields``: as :func:`lowbit.formats.ggml_blocks.check_fields` accepts (``q`` ``[O, I]``
    ...). Returns a C-contiguous numpy uint8 array ``[O, (I/super)*type_size]``, row ``o``
    being exactly the bytes ggml stores for that row.
    """
    b = block(name)
    f = check_fields(name, fields)
    n_rows, n_cols = f["q"].shape
    nb = n_cols // b.super
    q = _np_u8(f["q"]).reshape(n_rows, nb, b.super)
    ints = {k: _np_u8(v).reshape(n_rows, nb, -1) for k, v in f.items()
            if not b.field(k).is_float and k != "q"}
    halves = {k: _half_bytes(v.detach().cpu().numpy(), n_rows, nb) for k, v in f.items()
              if b.field(k).is_float}
    parts = _PACKERS[b.name](b, q, ints, halves)
    out = np.concatenate(parts, axis=-1)
    assert out.shape[-1] == b.type_size, (b.name, out.shape)
    return np.ascontiguousarray(out.reshape(n_rows, nb * b.type_size))


def _nib(q: np.ndarray, half: int) -> np.ndarray:
    """``[O, nb, n]`` codes < 16 -> ``[O, nb, n/2]``: chunks of 2*half, low nibble first."""
    n_rows, nb, n = q.shape
    return _or_shifted(q.reshape(n_rows, nb, n // (2 * half), 2, half), 4).reshape(n_rows, nb, -1)


def _bitplane(hbit: np.ndarray, k: int, bits: int) -> np.ndarray:
    """``[O, nb, k*L]`` small values -> ``[O, nb, L]``: value ``i*L + l`` at bits ``i*bits``."""
    n_rows, nb, n = hbit.shape
    return _or_shifted(hbit.reshape(n_rows, nb, k, n // k), bits)


def _p_q8_0(b, q, ints, h):
    return [h["d"], q]


def _p_q4_0(b, q, ints, h):
    return [h["d"], _nib(q, 16)]


def _p_q4_1(b, q, ints, h):
    return [h["d"], h["m"], _nib(q, 16)]


def _qh32(q: np.ndarray) -> np.ndarray:
    return np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")


def _p_q5_0(b, q, ints, h):
    return [h["d"], _qh32(q), _nib(q & np.uint8(15), 16)]


def _p_q5_1(b, q, ints, h):
    return [h["d"], h["m"], _qh32(q), _nib(q & np.uint8(15), 16)]


def _two_bit(q2: np.ndarray) -> np.ndarray:
    """``[O, nb, 256]`` 2-bit values -> 64 bytes: ``e = 128h + 32s + l`` at bits 2s."""
    n_rows, nb, _ = q2.shape
    return _or_shifted(q2.reshape(n_rows, nb, 2, 4, 32), 2).reshape(n_rows, nb, 64)


def _p_q2_k(b, q, ints, h):
    return [ints["sc"] | (ints["mn"] << np.uint8(4)), _two_bit(q), h["d"], h["dmin"]]


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    low = _or_shifted(np.stack([sc[..., :8], sc[..., 8:]], axis=-2) & np.uint8(15), 4)
    high = _bitplane(sc >> np.uint8(4), 4, 2)
    return np.concatenate([low, high], axis=-1)


def _p_q3_k(b, q, ints, h):
    hmask = _bitplane(q >> np.uint8(2), 8, 1)
    return [hmask, _two_bit(q & np.uint8(3)), _q3_scales(ints["sc"]), h["d"]]


def _p_q4_k(b, q, ints, h):
    return [h["d"], h["dmin"], _k_scales(ints["sc"], ints["mn"]), _nib(q, 32)]


def _p_q5_k(b, q, ints, h):
    return [h["d"], h["dmin"], _k_scales(ints["sc"], ints["mn"]), _bitplane(q >> np.uint8(4), 8, 1),
            _nib(q & np.uint8(15), 32)]


def _p_q6_k(b, q, ints, h):
    n_rows, nb, _ = q.shape
    ql = _nib(q & np.uint8(15), 64)
    qh = _or_shifted((q >> np.uint8(4)).reshape(n_rows, nb, 2, 4, 32), 2).reshape(n_rows, nb, 64)
    return [ql, qh, ints["sc"], h["d"]]


def _p_iq4_xs(b, q, ints, h):
    sc = ints["sc"]
    n_rows, nb, _ = sc.shape
    sh = np.zeros((n_rows, nb), dtype=np.uint16)
    for i in range(8):
        sh |= ((sc[..., i] >> np.uint8(4)).astype(np.uint16) << np.uint16(2 * i))
    scales_h = sh.astype("<u2").view(np.uint8).reshape(n_rows, nb, 2)
    scales_l = _nib(sc & np.uint8(15), 1)
    return [h["d"], scales_h, scales_l, _nib(q, 16)]


def _p_nvfp4(b, q, ints, h):
    return [ints["sc"], _nib(q, 8)]


_PACKERS = {
    "Q8_0": _p_q8_0, "Q4_0": _p_q4_0, "Q4_1": _p_q4_1, "Q5_0": _p_q5_0, "Q5_1": _p_q5_1,
    "Q2_K": _p_q2_k, "Q3_K": _p_q3_k, "Q4_K": _p_q4_k, "Q5_K": _p_q5_k, "Q6_K": _p_q6_k,
    "IQ4_NL": _p_q4_0, "IQ4_XS": _p_iq4_xs, "NVFP4": _p_nvfp4,
}


def _unnib(b: np.ndarray, half: int) -> np.ndarray:
    """Inverse of :func:`_nib`: ``[O, nb, n/2]`` bytes -> ``[O, nb, n]`` codes."""
    n_rows, nb, n2 = b.shape
    return _split_shifted(b.reshape(n_rows, nb, n2 // half, half), 2, 4).reshape(n_rows, nb, -1)


def _unplane(b: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`_bitplane`: ``[O, nb, L]`` -> ``[O, nb, k*L]``."""
    n_rows, nb, _ = b.shape
    return _split_shifted(b, k, bits).reshape(n_rows, nb, -1)


def _un_two_bit(b: np.ndarray) -> np.ndarray:
    n_rows, nb, _ = b.shape
    return _split_shifted(b.reshape(n_rows, nb, 2, 32), 4, 2).reshape(n_rows, nb, 256)


def _u_q8_0(p):
    return {"q": p[1].view(np.int8), "d": _half_from(p[0])}


def _u_q4_0(p):
    return {"q": _unnib(p[1], 16), "d": _half_from(p[0])}


def _u_q4_1(p):
    return {"q": _unnib(p[2], 16), "d": _half_from(p[0]), "m": _half_from(p[1])}


def _u_q5_0(p):
    qh = np.unpackbits(p[1], axis=-1, bitorder="little")
    return {"q": _unnib(p[2], 16) | (qh << np.uint8(4)), "d": _half_from(p[0])}


def _u_q5_1(p):
    qh = np.unpackbits(p[2], axis=-1, bitorder="little")
    return {"q": _unnib(p[3], 16) | (qh << np.uint8(4)), "d": _half_from(p[0]),
            "m": _half_from(p[1])}


def _u_q2_k(p):
    return {"q": _un_two_bit(p[1]), "sc": p[0] & np.uint8(15), "mn": p[0] >> np.uint8(4),
            "d": _half_from(p[2]), "dmin": _half_from(p[3])}


def _u_q3_k(p):
    hmask, qs, s, d = p
    q = _un_two_bit(qs) | (_unplane(hmask, 8, 1) << np.uint8(2))
    low = _unplane(s[..., :8], 2, 4)
    high = _unplane(s[..., 8:], 4, 2)
    return {"q": q, "sc": low | (high << np.uint8(4)), "d": _half_from(d)}


def _u_q4_k(p):
    sc, mn = _k_scales_from(p[2])
    return {"q": _unnib(p[3], 32), "sc": sc, "mn": mn, "d": _half_from(p[0]),
            "dmin": _half_from(p[1])}


def _u_q5_k(p):
    sc, mn = _k_scales_from(p[2])
    q = _unnib(p[4], 32) | (_unplane(p[3], 8, 1) << np.uint8(4))
    return {"q": q, "sc": sc, "mn": mn, "d": _half_from(p[0]), "dmin": _half_from(p[1])}


def _u_q6_k(p):
    ql, qh, sc, d = p
    n_rows, nb, _ = ql.shape
    high = _split_shifted(qh.reshape(n_rows, nb, 2, 32), 4, 2).reshape(n_rows, nb, 256)
    return {"q": _unnib(ql, 64) | (high << np.uint8(4)), "sc": sc.view(np.int8),
            "d": _half_from(d)}


def _u_iq4_xs(p):
    d, sh, sl, qs = p
    n_rows, nb, _ = sh.shape
    sh16 = np.ascontiguousarray(sh).view("<u2").reshape(n_rows, nb, 1)
    shifts = (np.arange(8, dtype=np.uint16) * np.uint16(2)).reshape(1, 1, 8)
    high = ((sh16 >> shifts) & np.uint16(3)).astype(np.uint8)
    return {"q": _unnib(qs, 16), "sc": _unnib(sl, 1) | (high << np.uint8(4)),
            "d": _half_from(d)}


def _u_nvfp4(p):
    return {"q": _unnib(p[1], 8), "sc": p[0]}


# bytes of each part of one block, in order, and the function turning parts into fields
_LAYOUT = {
    "Q8_0": ((2, 32), _u_q8_0), "Q4_0": ((2, 16), _u_q4_0), "Q4_1": ((2, 2, 16), _u_q4_1),
    "Q5_0": ((2, 4, 16), _u_q5_0), "Q5_1": ((2, 2, 4, 16), _u_q5_1),
    "Q2_K": ((16, 64, 2, 2), _u_q2_k), "Q3_K": ((32, 64, 12, 2), _u_q3_k),
    "Q4_K": ((2, 2, 12, 128), _u_q4_k), "Q5_K": ((2, 2, 12, 32, 128), _u_q5_k),
    "Q6_K": ((128, 64, 16, 2), _u_q6_k), "IQ4_NL": ((2, 16), _u_q4_0),
    "IQ4_XS": ((2, 2, 4, 128), _u_iq4_xs), "NVFP4": ((4, 32), _u_nvfp4),
}


def unpack(name: str, raw, n_cols: int) -> dict[str, torch.Tensor]:
    """Fields of ggml type ``name`` from its bytes (inverse of :func:`pack`).

    ``raw``: uint8 ``[O, (n_cols/super)*type_size]`` (numpy array or torch tensor; a 1-D
    array is one row); ``n_cols``: the row length ``I`` in elements. Returns the fields dict
    (torch tensors on the CPU, dtypes as ``GgmlField.dtype``), validated like
    :func:`~lowbit.formats.ggml_blocks.check_fields` (FormatError e.g. for an NVFP4 scale
    byte above 0x7E or a non-finite float16 scale).
    """
    b: GgmlBlock = block(name)
    a = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if a.dtype != np.uint8:
        raise FormatError(f"ggml type {name}: raw bytes must be uint8, got {a.dtype}")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise FormatError(f"ggml type {name}: raw bytes must be 2-D [O, nbytes], got shape "
                          f"{a.shape}")
    if not isinstance(n_cols, (int, np.integer)) or isinstance(n_cols, bool):
        raise FormatError(f"ggml type {name}: n_cols must be an int, got {n_cols!r}")
    n_rows = a.shape[0]
    check_shape(b, n_rows, int(n_cols))
    nb = int(n_cols) // b.super
    if a.shape[1] != nb * b.type_size:
        raise FormatError(f"ggml type {name}: {a.shape[1]} bytes per row, expected "
                          f"{nb * b.type_size} ({nb} blocks of {b.type_size} bytes for "
                          f"{n_cols} columns)")
    blocks = np.ascontiguousarray(a).reshape(n_rows, nb, b.type_size)
    sizes, fn = _LAYOUT[b.name]
    cuts = np.cumsum(sizes)[:-1]
    parts = [np.ascontiguousarray(x) for x in np.split(blocks, cuts, axis=-1)]
    got = fn(parts)
    out = {}
    for fld in b.fields:
        v = np.ascontiguousarray(got[fld.name]).reshape(n_rows, -1)
        t = torch.from_numpy(v.copy())
        out[fld.name] = t if fld.is_float else t.to(fld.dtype)
    check_fields(name, out)
    return out
