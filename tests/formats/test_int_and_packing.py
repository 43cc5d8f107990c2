"""Integer formats and sub-byte packing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import formats as F
from lowbit.errors import FormatError


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_ranges(bits):
    s, u = F.get(f"int{bits}"), F.get(f"uint{bits}")
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    n = s.narrowed()
    assert (n.qmin, n.qmax) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert s.num_values == 2**bits and n.num_values == 2**bits - 1


def test_twos_complement_and_ties():
    f = F.get("int4")
    x = torch.tensor([-1.0, -8.0, 7.0, 0.5, 1.5, 2.5, -2.5, 100.0, -100.0])
    assert f.encode(x).tolist() == [15, 8, 7, 0, 2, 2, 14, 7, 8]
    assert f.decode(f.encode(x)).tolist() == [-1, -8, 7, 0, 2, 2, -2, 7, -8]
    assert F.get("uint4").encode(torch.tensor([-3.0, 16.0])).tolist() == [0, 15]


@pytest.mark.parametrize("name", [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in (2, 4, 8)])
def test_decode_encode_equals_round(name):
    f = F.get(name)
    x = torch.linspace(-300, 300, 24001)
    assert torch.equal(f.decode(f.encode(x)), f.round(x))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 50), lead=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip(bits, n, lead, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (lead, n), generator=g).to(torch.uint8)
    p = F.pack(codes, bits)
    assert p.shape[-1] == F.packed_size(n, bits)
    assert torch.equal(F.unpack(p, bits, n), codes)


def test_bit_order():
    c = torch.tensor([[0x1, 0x2, 0x3, 0x4]], dtype=torch.uint8)
    assert F.pack(c, 4).tolist() == [[0x21, 0x43]]  # low nibble first
    c6 = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    word = 1 | 2 << 6 | 3 << 12 | 4 << 18
    assert F.pack(c6, 6).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    c2 = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert F.pack(c2, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]


def test_unpack_wrong_length():
    with pytest.raises(FormatError, match="expected 2"):
        F.unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)
