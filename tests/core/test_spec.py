"""QuantSpec: defaults, validation (one-line ConfigError via ``QuantSpec.parse``), helpers,
and a fuzz property over random spec dicts."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import formats as F
from lowbit.core import QuantSpec, block_format_names, get_block_format
from lowbit.errors import ConfigError, LowbitError

BLOCK_FORMATS = ["nvfp4", "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2"]


def parse_error(data, where="spec") -> str:
    with pytest.raises(ConfigError) as e:
        QuantSpec.parse(data, where=where)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{where}: ")
    return msg


# --- validation errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("data,msg", [
    ({"format": "int9"}, "unknown format 'int9'; expected one of: int2, int3"),
    ("int9", "unknown format 'int9'"),
    ({"format": "fp8_e4m3", "symmetric": False},
     "asymmetric quantization needs an integer format, not fp8_e4m3"),
    ({"format": "fp4_e2m1", "granularity": "group", "group_size": 32, "symmetric": False},
     "asymmetric quantization needs an integer format"),
    ({"format": "int8", "granularity": "token"},
     "granularity 'token' is computed per input: set dynamic: true"),
    ({"format": "nvfp4", "group_size": 32}, "format nvfp4 uses groups of 16; got group_size 32"),
    ({"format": "mxfp4", "group_size": 16}, "format mxfp4 uses groups of 32; got group_size 16"),
    ({"format": "mxfp4", "granularity": "channel"}, "format mxfp4 has its own granularity"),
    ({"format": "nvfp4", "axis": 0}, "format nvfp4 groups along the last axis; got axis 0"),
    ({"format": "mxfp8_e4m3", "symmetric": False}, "format mxfp8_e4m3 is symmetric"),
    ({"format": "nvfp4", "narrow_range": True}, "narrow_range is for integer formats"),
    ({"format": "mxfp4", "block": [32, 32]}, "block is only for granularity 'block'"),
    ({"format": "int4", "granularity": "group"}, "granularity 'group' needs a positive group_size"),
    ({"format": "int4", "granularity": "group", "group_size": 0}, "positive group_size"),
    ({"format": "int4", "granularity": "channel", "group_size": 32},
     "group_size is only for granularity 'group', not 'channel'"),
    ({"format": "int4", "group_size": 32}, "group_size is only for granularity 'group'"),
    ({"format": "int8", "granularity": "block"}, "granularity 'block' needs block"),
    ({"format": "int8", "granularity": "block", "block": [0, 4]}, "needs block"),
    ({"format": "int8", "block": [4, 4]}, "block is only for granularity 'block', not 'tensor'"),
    ({"format": "e8m0"}, "format e8m0 is a scale format, not an element format"),
    ({"format": "fp8_e4m3", "narrow_range": True}, "narrow_range is for integer formats"),
    ({"format": "int8", "colour": 1}, "unknown key 'colour'; expected one of: format,"),
    ({"granularity": "tensor"}, "format: Field required"),
    ({"format": "int8", "granularity": "row"}, "granularity: Input should be 'tensor'"),
    ({"format": "int8", "scale_format": "fp64"}, "scale_format: Input should be 'fp32'"),
    ({"format": "int8", "sym_scale": "max"}, "sym_scale: Input should be 'qmax' or"),
    ({"format": "int4", "granularity": "group", "group_size": "abc"}, "group_size: "),
    ({"format": 3}, "format: Input should be a valid string"),
])
def test_parse_errors_are_one_line_config_errors(data, msg):
    assert msg in parse_error(data)


def test_error_names_its_place():
    msg = parse_error({"format": "int9"}, where="layers.*.mlp.weight")
    assert msg.startswith("layers.*.mlp.weight: unknown format 'int9'")


def test_unknown_format_lists_element_and_block_formats():
    msg = parse_error({"format": "fp5"})
    for name in ["int4", "uint8", "fp8_e4m3", "fp4_e2m1", *BLOCK_FORMATS]:
        assert name in msg


def test_config_error_is_a_value_error_and_lowbit_error():
    with pytest.raises(ValueError):
        QuantSpec.parse({"format": "int9"})
    with pytest.raises(LowbitError):
        QuantSpec.parse({"format": "int9"})


# --- defaults and normalisation -----------------------------------------------------------------


def test_defaults():
    s = QuantSpec.parse("int8")
    assert s == QuantSpec(format="int8")
    assert (s.granularity, s.axis, s.group_size, s.block) == ("tensor", None, None, None)
    assert s.symmetric and not s.narrow_range and not s.dynamic
    assert (s.sym_scale, s.scale_format, s.calibrator) == ("half_range", "fp32", "max")
    assert QuantSpec.parse(s) is s  # a spec passes through


def test_axis_defaults():
    assert QuantSpec(format="int8", granularity="channel").axis == 0
    assert QuantSpec(format="int4", granularity="group", group_size=32).axis == -1
    assert QuantSpec(format="int4", granularity="group", group_size=32, axis=0).axis == 0
    assert QuantSpec(format="int8", granularity="channel", axis=-1).axis == -1


def test_block_tuple():
    s = QuantSpec.parse({"format": "fp8_e4m3", "granularity": "block", "block": [128, 128]})
    assert s.block == (128, 128) and s.granularity == "block"


@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_block_formats_fix_their_granularity(name):
    bf = get_block_format(name)
    assert bf is not None and name in block_format_names()
    for data in ({"format": name}, {"format": name, "granularity": "group"},
                 {"format": name, "group_size": bf.block_size, "axis": -1}):
        s = QuantSpec.parse(data)
        assert (s.granularity, s.group_size, s.axis) == ("group", bf.block_size, -1)
        assert s.scale_format == bf.scale_format
        assert s.element_format is F.get(bf.element)
        assert s.block_format is bf
    assert (bf.block_size, bf.scale_format) == ((16, "e4m3") if name == "nvfp4" else
                                                (32, "e8m0"))
    assert bf.global_scale == (name == "nvfp4")


def test_block_format_scale_format_is_forced():
    # the stored scale format of a block format is its own, whatever was asked
    assert QuantSpec.parse({"format": "mxfp4", "scale_format": "fp32"}).scale_format == "e8m0"


def test_bits_per_value():
    assert get_block_format("nvfp4").bits_per_value == 4 + 8 / 16
    assert get_block_format("mxfp4").bits_per_value == 4 + 8 / 32
    assert get_block_format("mxfp6_e2m3").bits_per_value == 6 + 8 / 32
    assert get_block_format("mxfp8_e5m2").bits_per_value == 8 + 8 / 32


# --- helpers ------------------------------------------------------------------------------------


def test_element_format_and_bits():
    assert QuantSpec(format="int4").element_format is F.get("int4")
    n = QuantSpec(format="int4", narrow_range=True).element_format
    assert n.narrow and (n.qmin, n.qmax) == (-7, 7)
    assert QuantSpec(format="nvfp4").bits == 4
    assert QuantSpec(format="mxfp6_e3m2").bits == 6
    assert QuantSpec(format="fp8_e5m2").bits == 8
    assert QuantSpec(format="uint3").bits == 3
    assert QuantSpec(format="int8").block_format is None


@pytest.mark.parametrize("fmt,bits", [("fp32", 32), ("fp16", 16), ("bf16", 16), ("e8m0", 8),
                                      ("e4m3", 8)])
def test_scale_bits(fmt, bits):
    assert QuantSpec(format="int8", scale_format=fmt).scale_bits() == bits


@pytest.mark.parametrize("data,short", [
    ({"format": "int4", "granularity": "group", "group_size": 64, "symmetric": False},
     "int4 g64 asym"),
    ({"format": "fp8_e4m3", "granularity": "token", "dynamic": True}, "fp8_e4m3 token dyn"),
    ({"format": "int8", "granularity": "channel"}, "int8 ch0"),
    ({"format": "int8"}, "int8 tensor"),
    ({"format": "nvfp4"}, "nvfp4 g16"),
    ({"format": "fp8_e4m3", "granularity": "block", "block": [128, 128]},
     "fp8_e4m3 b(128, 128)"),
])
def test_short(data, short):
    assert QuantSpec.parse(data).short() == short


def test_frozen_and_comparable():
    s = QuantSpec(format="int8")
    with pytest.raises(Exception):
        s.format = "int4"  # type: ignore[misc]
    assert s.format == "int8"
    assert QuantSpec(format="int4", granularity="group", group_size=32) == \
        QuantSpec.parse({"format": "int4", "granularity": "group", "group_size": 32, "axis": -1})
    assert QuantSpec(format="int4") != QuantSpec(format="int4", symmetric=False)


# --- fuzz: any dict either parses to a consistent spec or raises a one-line ConfigError ---------

FORMAT_NAMES = [n for n in F.names()] + BLOCK_FORMATS + ["int9", "fp5", "", "INT8"]
spec_dicts = st.fixed_dictionaries({"format": st.sampled_from(FORMAT_NAMES)}, optional={
    "granularity": st.sampled_from(["tensor", "channel", "group", "block", "token", "row", None]),
    "axis": st.one_of(st.none(), st.integers(-3, 3)),
    "group_size": st.sampled_from([None, -1, 0, 7, 16, 32, 128, "abc"]),
    "block": st.sampled_from([None, (32, 32), [128, 128], (0, 4), [1], "x"]),
    "symmetric": st.booleans(),
    "narrow_range": st.booleans(),
    "sym_scale": st.sampled_from(["qmax", "half_range", "max"]),
    "dynamic": st.booleans(),
    "scale_format": st.sampled_from(["fp32", "fp16", "bf16", "e8m0", "e4m3", "fp64"]),
    "calibrator": st.sampled_from(["max", "histogram"]),
    "colour": st.just(1),
})


@settings(max_examples=300, deadline=None)
@given(data=spec_dicts)
def test_parse_fuzz(data):
    try:
        s = QuantSpec.parse(data)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("spec: ")
        return
    g = s.granularity
    assert g in ("tensor", "channel", "group", "block", "token")
    bf = s.block_format
    if bf is not None:
        assert (g, s.group_size, s.axis, s.scale_format) == ("group", bf.block_size, -1,
                                                             bf.scale_format)
        assert s.symmetric
    else:
        fmt = F.get(s.format)
        assert fmt.kind == "int" or fmt.signed  # e8m0 (a scale format) is no element format
        if not s.symmetric or s.narrow_range:
            assert fmt.kind == "int"
    if g == "group":
        assert s.group_size >= 1 and s.axis is not None
    else:
        assert s.group_size is None
    if g == "channel":
        assert s.axis is not None
    if g == "block":
        assert min(s.block) >= 1
    else:
        assert s.block is None
    if g == "token":
        assert s.dynamic
    # normalised specs are fixed points of parse
    assert QuantSpec.parse(s.model_dump()) == s
