"""Integer formats int2..int8 / uint2..uint8: ranges, two's-complement codes, the narrow
variant, round-to-nearest-even, saturation, and decode(encode(x)) == round(x)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import formats as F
from lowbit.formats import IntFormat

BITS = range(2, 9)
SIGNED = [f"int{b}" for b in BITS]
UNSIGNED = [f"uint{b}" for b in BITS]


def all_int_formats():
    """Every registered integer format plus the narrow variant of every signed one."""
    fmts = [F.get(n) for n in SIGNED + UNSIGNED]
    return fmts + [F.get(n).narrowed() for n in SIGNED]


def bits_of(t: torch.Tensor) -> list[int]:
    return t.float().view(torch.int32).tolist()


# --- registry and ranges --------------------------------------------------------------------


def test_registry_has_every_width():
    names = F.names()
    for n in SIGNED + UNSIGNED:
        assert n in names
        f = F.get(n)
        assert isinstance(f, IntFormat) and f.kind == "int" and f.name == n
    assert F.get(F.get("int4")) is F.get("int4")  # a Format passes through


@pytest.mark.parametrize("b", BITS)
def test_ranges(b):
    s, u = F.get(f"int{b}"), F.get(f"uint{b}")
    assert s.bits == u.bits == b
    assert (s.qmin, s.qmax) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**b - 1)
    assert (s.min, s.max) == (float(s.qmin), float(s.qmax))
    assert (u.min, u.max) == (0.0, float(2**b - 1))
    assert s.signed and not u.signed
    assert s.min_normal == s.min_subnormal == 1.0
    assert torch.equal(s.values(), torch.arange(s.qmin, s.qmax + 1, dtype=torch.float32))
    assert torch.equal(u.values(), torch.arange(0, 2**b, dtype=torch.float32))
    assert s.num_values == u.num_values == 2**b
    assert s.layout() == "int" and u.layout() == "uint"
    assert f"[{s.qmin}, {s.qmax}]" in s.describe()
    row = s.as_dict()
    assert (row["name"], row["bits"], row["max"], row["values"]) == (f"int{b}", b, s.max, 2**b)


@pytest.mark.parametrize("b", BITS)
def test_narrow_variant(b):
    s = F.get(f"int{b}")
    n = s.narrowed()
    assert n.narrow and not s.narrow  # the registered format is unchanged
    assert n.name == f"int{b}_narrow" and n.bits == b
    assert (n.qmin, n.qmax) == (-(2 ** (b - 1)) + 1, 2 ** (b - 1) - 1)
    assert n.qmin == -n.qmax  # symmetric grid
    assert n.num_values == 2**b - 1
    assert "narrow" in n.describe()
    # the dropped value -2^(b-1) saturates to -(2^(b-1) - 1); codes stay two's complement
    lo = float(-(2 ** (b - 1)))
    assert n.round(torch.tensor([lo, lo - 100])).tolist() == [lo + 1, lo + 1]
    assert n.encode(torch.tensor([lo])).tolist() == [2 ** (b - 1) + 1]
    assert n.decode(n.encode(torch.tensor([lo]))).tolist() == [lo + 1]


# --- codes ----------------------------------------------------------------------------------


def test_int4_twos_complement_examples():
    f = F.get("int4")
    x = torch.tensor([-1.0, -8.0, 7.0, 0.0, 1.0, -2.0])
    c = f.encode(x)
    assert c.dtype == torch.uint8
    assert c.tolist() == [15, 8, 7, 0, 1, 14]
    assert f.decode(c).tolist() == x.tolist()
    assert f.decode(c).dtype == torch.float32


@pytest.mark.parametrize("b", BITS)
def test_twos_complement_every_value(b):
    s, u = F.get(f"int{b}"), F.get(f"uint{b}")
    vals = torch.arange(s.qmin, s.qmax + 1)
    codes = s.encode(vals.float())
    assert codes.tolist() == [v % 2**b for v in vals.tolist()]  # two's complement, low bits
    assert torch.equal(s.code_to_int(codes), vals.to(torch.int32))
    assert torch.equal(s.to_int(vals.float()), vals.to(torch.int32))
    # every code decodes to its two's-complement value
    all_codes = torch.arange(2**b).to(torch.uint8)
    expect = [c - 2**b if c >= 2 ** (b - 1) else c for c in range(2**b)]
    assert s.decode(all_codes).tolist() == expect
    # unsigned: the code is the value
    assert u.encode(torch.arange(2**b).float()).tolist() == list(range(2**b))
    assert u.decode(all_codes).tolist() == list(range(2**b))


@pytest.mark.parametrize("name", SIGNED + UNSIGNED)
def test_decode_ignores_high_bits(name):
    f = F.get(name)
    codes = torch.arange(2**f.bits).to(torch.uint8)
    junk = codes | (0xFF ^ (2**f.bits - 1))  # set every bit above the code
    assert torch.equal(f.decode(junk), f.decode(codes))


def test_encode_accepts_half_precision_inputs():
    f = F.get("int8")
    x = torch.tensor([-130.0, -2.5, -0.5, 0.5, 1.5, 3.75, 125.0, 300.0])  # exact in bf16
    want = f.encode(x)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(f.encode(x.to(dt)), want)
        assert f.round(x.to(dt)).dtype == torch.float32


# --- rounding and saturation ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", all_int_formats(), ids=lambda f: f.name)
def test_round_to_nearest_even(fmt):
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 0.50000006, 1.4999999])
    want = torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 0.0, 1.0, 1.0])
    assert fmt.round(x).tolist() == want.clamp(fmt.qmin, fmt.qmax).tolist()


def test_ties_examples_int8():
    f = F.get("int8")
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -3.5, 126.5, -127.5, 127.5, -128.5])
    assert f.round(x).tolist() == [0, 2, 2, 4, -4, 126, -128, 127, -128]
    assert f.decode(f.encode(x)).tolist() == [0, 2, 2, 4, -4, 126, -128, 127, -128]


def test_no_negative_zero():
    # integers have no -0: round() must give what decode(encode()) gives, +0.0
    for name in ("int4", "int8", "uint4"):
        y = F.get(name).round(torch.tensor([-0.0, -0.3, -0.5]))
        assert bits_of(y) == [0, 0, 0], name


@pytest.mark.parametrize("fmt", all_int_formats(), ids=lambda f: f.name)
def test_saturation(fmt):
    x = torch.tensor([1e9, -1e9, fmt.qmax + 0.75, fmt.qmin - 0.75, float("inf"), float("-inf"),
                      3.4e38, -3.4e38])
    y = fmt.round(x)
    hi, lo = float(fmt.qmax), float(fmt.qmin)
    assert y.tolist() == [hi, lo, hi, lo, hi, lo, hi, lo]
    assert fmt.decode(fmt.encode(x)).tolist() == y.tolist()
    assert torch.isfinite(y).all()


def test_unsigned_saturates_negatives_to_zero():
    f = F.get("uint4")
    assert f.encode(torch.tensor([-3.0, -0.4, 16.0, 15.5, 14.5])).tolist() == [0, 0, 15, 15, 14]


@pytest.mark.parametrize("fmt", all_int_formats(), ids=lambda f: f.name)
def test_decode_encode_equals_round_dense_grid(fmt):
    # dense grid over (and well beyond) every range, plus every exact half integer
    grid = torch.cat([torch.linspace(-300, 300, 12_001),
                      torch.arange(-300, 301, dtype=torch.float32) + 0.5,
                      torch.tensor([-0.0, 0.0, 2.0**-30, -(2.0**-30)])])
    via_codes = fmt.decode(fmt.encode(grid))
    direct = fmt.round(grid)
    assert torch.equal(via_codes.view(torch.int32), direct.view(torch.int32))
    # and round() is the nearest-even integer, clamped: an independent reference
    ref = torch.round(grid.double()).clamp(fmt.qmin, fmt.qmax).float() + 0.0
    assert torch.equal(direct.view(torch.int32), ref.view(torch.int32))


@settings(max_examples=200, deadline=None)
@given(v=st.floats(-1e6, 1e6, allow_nan=False, width=32),
       name=st.sampled_from(SIGNED + UNSIGNED), narrow=st.booleans())
def test_round_is_nearest_representable(v, name, narrow):
    fmt = F.get(name)
    if narrow and fmt.is_signed:
        fmt = fmt.narrowed()
    y = float(fmt.round(torch.tensor([v]))[0])
    assert fmt.qmin <= y <= fmt.qmax and y == int(y)
    clamped = min(max(v, fmt.qmin), fmt.qmax)
    assert abs(y - clamped) <= 0.5
    if abs(y - clamped) == 0.5:  # a tie goes to the even neighbour
        assert int(y) % 2 == 0
    assert float(fmt.decode(fmt.encode(torch.tensor([v])))[0]) == y
