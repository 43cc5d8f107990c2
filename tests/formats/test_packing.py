"""Sub-byte packing along the last dimension: round trips for every width 1..8 and any
shape, and the documented little-endian bit order, checked against hand-computed bytes and
an independent pure-Python bit-stream packer."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import formats as F
from lowbit.errors import FormatError


def reference_pack_row(codes: list[int], bits: int) -> list[int]:
    """The documented bit order, written as plainly as possible: code i occupies stream bits
    [i*bits, (i+1)*bits), byte k holds stream bits [8k, 8k+8), lowest stream bit in the
    byte's least significant bit; the row is padded with zero codes to a whole unit."""
    unit_codes = math.lcm(bits, 8) // bits
    codes = codes + [0] * ((-len(codes)) % unit_codes)
    stream = []
    for c in codes:
        stream += [(c >> j) & 1 for j in range(bits)]
    return [sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8)]


def random_codes(seed, shape, bits):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32).to(torch.uint8)


shapes = st.tuples(
    st.lists(st.integers(0, 3), min_size=0, max_size=3),  # leading dims (zero-size included)
    st.integers(0, 70),  # row length
).map(lambda t: (*t[0], t[1]))


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, shape, seed):
    codes = random_codes(seed, shape, bits)
    p = F.pack(codes, bits)
    n = shape[-1]
    assert p.dtype == torch.uint8
    assert p.shape == (*shape[:-1], F.packed_size(n, bits))
    u = F.unpack(p, bits, n)
    assert u.dtype == torch.uint8 and u.shape == codes.shape
    assert torch.equal(u, codes)


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 40), rows=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_pack_matches_reference_bit_stream(bits, n, rows, seed):
    codes = random_codes(seed, (rows, n), bits)
    p = F.pack(codes, bits)
    for r in range(rows):
        assert p[r].tolist() == reference_pack_row(codes[r].tolist(), bits)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 7), n=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_pack_ignores_bits_above_the_code(bits, n, seed):
    codes = random_codes(seed, (2, n), 8)  # garbage in the high bits
    low = codes & (2**bits - 1)
    assert torch.equal(F.pack(codes, bits), F.pack(low, bits))
    assert torch.equal(F.unpack(F.pack(codes, bits), bits, n), low)


def test_pack_leaves_input_alone_and_copies():
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    keep = codes.clone()
    for bits in (4, 8):
        p = F.pack(codes, bits)
        p.fill_(0)  # the result is a new tensor, even for 8 bits
        assert torch.equal(codes, keep)


def test_non_contiguous_input():
    codes = random_codes(0, (8, 6), 4).t()  # [6, 8], non-contiguous
    assert torch.equal(F.unpack(F.pack(codes, 4), 4, 8), codes)


# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_size(bits):
    unit_codes, unit_bytes = math.lcm(bits, 8) // bits, math.lcm(bits, 8) // 8
    for n in range(0, 50):
        size = F.packed_size(n, bits)
        assert size == -(-n // unit_codes) * unit_bytes
        assert size >= -(-n * bits // 8)  # never fewer bytes than the bits need
        if n % unit_codes == 0:
            assert size == n * bits // 8  # whole units: no padding at all


def test_packed_size_examples():
    assert F.packed_size(3, 4) == 2
    assert F.packed_size(4, 6) == 3 and F.packed_size(5, 6) == 6
    assert F.packed_size(8, 3) == 3 and F.packed_size(1, 3) == 3
    assert F.packed_size(9, 1) == 2
    assert F.packed_size(7, 8) == 7


# --- the documented bit order, by hand ---------------------------------------------------------


def test_4bit_low_nibble_first():
    c = torch.tensor([[0x1, 0x2, 0x3, 0x4], [0xF, 0x0, 0x0, 0xA]], dtype=torch.uint8)
    # byte k = c[2k] | c[2k+1] << 4
    assert F.pack(c, 4).tolist() == [[0x21, 0x43], [0x0F, 0xA0]]
    # odd length: the last byte's high nibble is a zero pad
    assert F.pack(torch.tensor([[0x7, 0x9, 0x5]], dtype=torch.uint8), 4).tolist() == \
        [[0x97, 0x05]]


def test_6bit_four_codes_in_three_bytes():
    # 24-bit little-endian word c0 | c1 << 6 | c2 << 12 | c3 << 18, computed by hand:
    # c = 1, 2, 3, 4 -> 0x000001 | 0x000080 | 0x003000 | 0x100000 = 0x103081
    c = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert F.pack(c, 6).tolist() == [[0x81, 0x30, 0x10]]
    # c = 63, 0, 63, 0 -> 0x00003F | 0x03F000 = 0x03F03F
    c = torch.tensor([[63, 0, 63, 0]], dtype=torch.uint8)
    assert F.pack(c, 6).tolist() == [[0x3F, 0xF0, 0x03]]
    # c = 0, 63, 0, 63 -> 0x000FC0 | 0xFC0000 = 0xFC0FC0
    c = torch.tensor([[0, 63, 0, 63]], dtype=torch.uint8)
    assert F.pack(c, 6).tolist() == [[0xC0, 0x0F, 0xFC]]
    # five codes: a second unit, padded with zero codes
    c = torch.tensor([[1, 2, 3, 4, 0x2A]], dtype=torch.uint8)
    assert F.pack(c, 6).tolist() == [[0x81, 0x30, 0x10, 0x2A, 0x00, 0x00]]


def test_2bit_and_1bit_and_3bit_order():
    c2 = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert F.pack(c2, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    c1 = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.uint8)
    assert F.pack(c1, 1).tolist() == [[0x81, 0x01]]
    # 3 bits: 8 codes in 3 bytes, c0 | c1 << 3 | ... | c7 << 21
    c3 = torch.tensor([[7, 1, 0, 0, 0, 0, 0, 5]], dtype=torch.uint8)
    word = 7 | 1 << 3 | 5 << 21
    assert F.pack(c3, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_8bit_is_identity():
    c = random_codes(1, (3, 5), 8)
    assert torch.equal(F.pack(c, 8), c)
    assert torch.equal(F.unpack(c, 8, 5), c)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_wrong_length_raises(bits):
    n = 10
    good = F.packed_size(n, bits)
    for size in (good - 1, good + 1):
        with pytest.raises(FormatError, match=f"expected {good}"):
            F.unpack(torch.zeros(2, size, dtype=torch.uint8), bits, n)


def test_unpack_wrong_length_example():
    with pytest.raises(FormatError, match="packed row has 3 bytes; expected 2"):
        F.unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_width_raises(bits):
    with pytest.raises(FormatError, match="1..8 bits"):
        F.pack(torch.zeros(1, 4, dtype=torch.uint8), bits)
    with pytest.raises(FormatError, match="1..8 bits"):
        F.unpack(torch.zeros(1, 4, dtype=torch.uint8), bits, 4)


def test_pack_needs_uint8():
    with pytest.raises(FormatError, match="uint8"):
        F.pack(torch.zeros(1, 4, dtype=torch.int32), 4)
