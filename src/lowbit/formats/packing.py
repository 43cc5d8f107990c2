"""Sub-byte packing of codes along the last dimension.

Bit order (little-endian bit stream, the convention of compressed-tensors' NVFP4, MX and
most kernels): code ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the row's bit stream,
and byte ``k`` holds stream bits ``[8k, 8k+8)`` with the stream's lowest bit in the byte's
least significant bit. Hence:

* 4-bit: byte ``k`` = ``code[2k] | code[2k+1] << 4`` (low nibble first);
* 6-bit: 4 codes in 3 bytes: ``c0 | c1 << 6 | c2 << 12 | c3 << 18`` as a 24-bit
  little-endian integer;
* 2-bit: ``c0 | c1 << 2 | c2 << 4 | c3 << 6``;
* any other width works the same way.

A row whose bit length is not a multiple of the packing unit is padded with zero codes;
``unpack`` needs the original length ``n`` to drop the padding.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import FormatError


def _unit(bits: int) -> tuple[int, int]:
    """(codes per unit, bytes per unit) of the smallest whole-byte unit."""
    l = math.lcm(bits, 8)
    return l // bits, l // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits (padded to a whole unit)."""
    per, nbytes = _unit(bits)
    return -(-n // per) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` of shape ``[..., n]`` into uint8 ``[..., packed_size(n, bits)]``."""
    if not 1 <= bits <= 8:
        raise FormatError(f"cannot pack {bits}-bit codes; expected 1..8 bits")
    if codes.dtype != torch.uint8:
        raise FormatError(f"pack expects uint8 codes, got {codes.dtype}")
    if bits == 8:
        return codes.clone()
    per, nbytes = _unit(bits)
    n = codes.shape[-1]
    pad = (-n) % per
    c = codes.to(torch.int64) & (2**bits - 1)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    # explicit sizes (not -1): a zero-size leading dim makes -1 ambiguous
    c = c.reshape(*codes.shape[:-1], (n + pad) // per, per)
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1)  # [..., units], < 2^(8*nbytes) <= 2^56
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.flatten(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., packed_size(n)]`` -> uint8 codes ``[..., n]``."""
    if not 1 <= bits <= 8:
        raise FormatError(f"cannot unpack {bits}-bit codes; expected 1..8 bits")
    if packed.shape[-1] != packed_size(n, bits):
        raise FormatError(
            f"packed row has {packed.shape[-1]} bytes; expected {packed_size(n, bits)} "
            f"for {n} codes of {bits} bits"
        )
    if bits == 8:
        return packed.clone()
    per, nbytes = _unit(bits)
    p = packed.to(torch.int64).reshape(*packed.shape[:-1], packed.shape[-1] // nbytes, nbytes)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=packed.device) * 8
    word = (p << byte_shifts).sum(-1)
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    c = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.flatten(-2)[..., :n].to(torch.uint8)
