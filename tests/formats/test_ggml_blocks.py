"""ggml block types as fields (lowbit.formats.ggml_blocks / ggml_pack).

The truth is the `gguf` package (its block sizes, type ids and reference dequantizers) and,
where built, ggml's own quantizers (``ggml_quantize_chunk``, tests marked ``external``):
for every type, random and edge fields are packed, dequantized by gguf and compared bit for
bit with lowbit's dequantize; unpack inverts pack; ggml's and gguf's own quantized bytes
unpack and repack to the same bytes.
"""

import numpy as np
import pytest
import torch

from lowbit.errors import FormatError
from lowbit.formats import ggml_blocks as gb
from lowbit.formats.ggml_blocks import GGML_BLOCKS, dequantize, pack, unpack
from tests.formats.ggml_ref import ggml_quantize, libggml

gguf = pytest.importorskip("gguf")

NAMES = list(GGML_BLOCKS)


def _qtype(name):
    return gguf.GGMLQuantizationType[name]


def _gguf_dequant(name, raw):
    return gguf.quants.dequantize(raw, _qtype(name))


def _random_fields(name, n_rows=3, n_blocks=2, seed=0, scale=0.01):
    b = GGML_BLOCKS[name]
    g = torch.Generator().manual_seed(seed)
    n_cols = n_blocks * b.super
    out = {}
    for f in b.fields:
        shape = (n_rows, n_cols // f.per)
        if f.is_float:
            out[f.name] = (torch.randn(shape, generator=g) * scale).half().float()
        else:
            out[f.name] = torch.randint(f.lo, f.hi + 1, shape, generator=g).to(f.dtype)
    return out


def _assert_fields_equal(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def _check_exact(name, fields):
    """pack -> gguf dequantize == lowbit dequantize bit for bit; unpack(pack) == fields."""
    b = GGML_BLOCKS[name]
    raw = pack(name, fields)
    n_rows, n_cols = fields["q"].shape
    assert raw.dtype == np.uint8 and raw.shape == (n_rows, n_cols // b.super * b.type_size)
    ref = _gguf_dequant(name, raw)
    mine = dequantize(name, fields)
    assert mine.dtype == torch.float32 and mine.shape == (n_rows, n_cols)
    assert not np.isnan(ref).any()
    assert np.array_equal(ref, mine.numpy()), name
    _assert_fields_equal(unpack(name, raw, n_cols), fields)
    return raw


# ---- the registry against gguf's constants --------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_registry_matches_gguf(name):
    b = GGML_BLOCKS[name]
    assert b.name == name
    assert b.ggml_type == int(_qtype(name))
    assert gguf.GGML_QUANT_SIZES[_qtype(name)] == (b.super, b.type_size)
    assert b.super % b.sub == 0
    assert b.field_names[0] == "q"
    for f in b.fields:
        assert f.per in (1, b.sub, b.super, 32)
        assert b.super % f.per == 0


def test_code_books_match_gguf():
    assert gb.KVALUES_IQ4NL == tuple(gguf.quants.IQ4_NL.kvalues)
    assert gb.KVALUES_NVFP4 == tuple(gguf.quants.NVFP4.kvalues)


def test_code_range_and_field():
    b = GGML_BLOCKS["Q6_K"]
    assert b.code_range("q") == (0, 63)
    assert b.code_range("sc") == (-128, 127)
    assert GGML_BLOCKS["NVFP4"].code_range("sc") == (0, 0x7E)
    with pytest.raises(FormatError, match="float16 scale"):
        b.code_range("d")
    with pytest.raises(FormatError, match="no field 'mn'"):
        b.field("mn")


# ---- bit exactness against gguf's dequantizers ---------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_fields_exact(name, seed):
    _check_exact(name, _random_fields(name, seed=seed))


@pytest.mark.parametrize("name", NAMES)
def test_wide_scales_exact(name):
    # float16 scales over their whole range (subnormals to large values): products round
    _check_exact(name, _random_fields(name, n_rows=4, n_blocks=3, seed=7, scale=300.0))
    f = _random_fields(name, seed=8)
    for k, v in f.items():
        if v.is_floating_point():
            f[k] = (torch.rand(v.shape, generator=torch.Generator().manual_seed(9)) * 1e-4
                    - 5e-5).half().float()  # float16 subnormals and small normals
    _check_exact(name, f)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("edge", ["min", "max"])
def test_edge_codes_exact(name, edge):
    """All codes and sub-scales at their minimum / maximum; zero, negative and extreme
    float16 scales."""
    b = GGML_BLOCKS[name]
    f = _random_fields(name, n_rows=5)
    for fl in b.fields:
        if not fl.is_float:
            f[fl.name] = torch.full_like(f[fl.name], fl.lo if edge == "min" else fl.hi)
    floats = torch.tensor([0.0, -0.0, -1.5, 65504.0, -65504.0, 6e-8, -0.000123, 1.0])
    for k, v in f.items():
        if v.is_floating_point():
            idx = torch.arange(v.numel()).reshape(v.shape) % len(floats)
            f[k] = floats.half().float()[(idx + len(k)) % len(floats)]
    _check_exact(name, f)


def test_nvfp4_every_scale_byte():
    """Every ue4m3 byte ggml writes (0..0x7E: zero, subnormals 1..7, normals) times every
    e2m1 code."""
    n_sub = 127
    sc = torch.arange(n_sub, dtype=torch.uint8).reshape(1, n_sub).repeat(16, 1)
    # pad to a whole 64-column block: 127 sub-blocks -> 128
    sc = torch.cat([sc, torch.full((16, 1), 0x38, dtype=torch.uint8)], 1)
    q = torch.arange(16, dtype=torch.uint8).reshape(16, 1).repeat(1, 16 * (n_sub + 1))
    raw = _check_exact("NVFP4", {"q": q, "sc": sc})
    x = dequantize("NVFP4", {"q": q, "sc": sc})
    # byte 0x38 = 2^0 -> ue4m3 1.0; value = 1.0/2 * 2*e2m1(code)
    assert x[7, -16:].unique().tolist() == [6.0]                # code 7: e2m1 6.0
    assert x[7, 0 * 16 + 0].item() == 0.0                  # scale byte 0 -> 0
    assert x[7, 1 * 16].item() == 2.0 ** -9 * 0.5 * 12     # subnormal byte 1, code 7 (6.0)
    assert raw.shape == (16, 32 * 36)


def test_hand_written_bytes():
    """A few layout facts written out by hand (ggml-common.h), independent of gguf."""
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 0], q[0, 16], q[0, 31] = 1, 2, 15
    d = torch.tensor([[1.0]])
    raw = pack("Q4_0", {"q": q, "d": d})
    assert raw[0, :2].tolist() == [0x00, 0x3C]                  # float16 1.0, little-endian
    assert raw[0, 2] == 0x21 and raw[0, 2 + 15] == 0xF0         # q[j] | q[j+16] << 4
    q5 = torch.zeros(1, 32, dtype=torch.uint8)
    q5[0, 9] = 16
    raw = pack("Q5_0", {"q": q5, "d": d})
    assert raw[0, 2:6].tolist() == [0, 2, 0, 0]                 # qh bit 9
    sc = torch.arange(8, dtype=torch.uint8).reshape(1, 8) + 56  # 56..63 (6 bits)
    mn = torch.arange(8, dtype=torch.uint8).reshape(1, 8) + 16
    f = {"q": torch.zeros(1, 256, dtype=torch.uint8), "sc": sc, "mn": mn, "d": d, "dmin": d}
    s = pack("Q4_K", f)[0, 4:16].tolist()
    assert s[0] == 56 | ((60 >> 4) << 6) and s[4] == 16 | ((20 >> 4) << 6)
    assert s[8] == (60 & 15) | ((20 & 15) << 4)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q8_0"])
def test_any_integer_dtype_accepted(name):
    f = _random_fields(name, seed=3)
    wide = {k: (v if v.is_floating_point() else v.to(torch.int64)) for k, v in f.items()}
    assert np.array_equal(pack(name, wide), pack(name, f))
    assert torch.equal(dequantize(name, wide), dequantize(name, f))


def test_unpack_accepts_torch_and_one_row():
    f = _random_fields("Q5_K", n_rows=1)
    raw = pack("Q5_K", f)
    _assert_fields_equal(unpack("Q5_K", torch.from_numpy(raw), 512), f)
    _assert_fields_equal(unpack("Q5_K", raw[0], 512), f)


# ---- real quantized tensors: gguf's and ggml's quantizers ----------------------------

def _weight(n_rows=16, n_cols=512, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32) * 0.02
    w[0, :7] = [0.5, -0.5, 0.0, 1e-9, -3.0, 2.0, 0.25]  # outliers and tiny values
    w[1] = 0.0                                           # an all-zero row (scale 0)
    return w


def _check_real(name, raw, n_cols):
    fields = unpack(name, raw, n_cols)
    assert np.array_equal(pack(name, fields), raw)
    assert np.array_equal(dequantize(name, fields).numpy(), _gguf_dequant(name, raw))


@pytest.mark.parametrize("name", NAMES)
def test_gguf_quantized_tensor_round_trips(name):
    w = _weight()
    try:
        raw = gguf.quants.quantize(w, _qtype(name))
    except NotImplementedError:
        pytest.skip(f"the gguf package cannot quantize {name}")
    _check_real(name, raw, w.shape[1])


@pytest.mark.external
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_ggml_quantized_tensor_round_trips(name, with_imatrix):
    if libggml() is None:
        pytest.skip("needs llama.cpp's libggml-base.so (LOWBIT_LLAMA_BIN)")
    b = GGML_BLOCKS[name]
    w = _weight(seed=1)
    im = np.random.default_rng(2).random(w.shape[1]).astype(np.float32) + 0.1
    raw = ggml_quantize(b.ggml_type, b.type_size, b.super, w, im if with_imatrix else None)
    _check_real(name, raw, w.shape[1])


# ---- errors ---------------------------------------------------------------------------

def test_unknown_type_lists_known():
    with pytest.raises(FormatError, match=r"unknown ggml block type 'Q4_X'; known: Q8_0, .*NVFP4"):
        dequantize("Q4_X", {})
    with pytest.raises(FormatError, match="unknown ggml block type"):
        pack("q4_k", {})
    with pytest.raises(FormatError, match="unknown ggml block type"):
        unpack("MXFP4", np.zeros((1, 17), np.uint8), 32)


@pytest.mark.parametrize("name", NAMES)
def test_out_of_range_fields(name):
    b = GGML_BLOCKS[name]
    for fl in b.fields:
        if fl.is_float:
            continue
        for bad in (fl.lo - 1, fl.hi + 1):
            f = _random_fields(name)
            v = f[fl.name].to(torch.int32)
            v[0, -1] = bad
            f[fl.name] = v
            msg = rf"{name}: field '{fl.name}' has values in .*expected {fl.lo}\.\.{fl.hi}"
            with pytest.raises(FormatError, match=msg):
                pack(name, f)
            with pytest.raises(FormatError, match=msg):
                dequantize(name, f)


def test_shape_and_field_errors():
    f = _random_fields("Q4_K")
    with pytest.raises(FormatError, match=r"field 'sc' has shape \(3, 15\), expected \(3, 16\)"):
        dequantize("Q4_K", {**f, "sc": f["sc"][:, :15]})
    with pytest.raises(FormatError, match=r"missing \['mn'\], unknown \['zp'\]"):
        dequantize("Q4_K", {**{k: v for k, v in f.items() if k != "mn"}, "zp": f["d"]})
    with pytest.raises(FormatError, match="'q' must be 2-D"):
        dequantize("Q4_K", {**f, "q": f["q"][0]})
    g = _random_fields("Q4_0")
    with pytest.raises(FormatError, match="row length .* 48 is not a positive multiple of its "
                                          "block size 32"):
        pack("Q4_0", {"q": torch.zeros(3, 48, dtype=torch.uint8), "d": torch.zeros(3, 1)})
    with pytest.raises(FormatError, match="must be an integer tensor"):
        pack("Q4_0", {**g, "q": g["q"].float()})
    with pytest.raises(FormatError, match="'d' must be a float tensor"):
        pack("Q4_0", {**g, "d": g["d"].to(torch.int32)})
    with pytest.raises(FormatError, match=r"'d' holds 0\.1.*not a float16 value"):
        pack("Q4_0", {**g, "d": torch.full_like(g["d"], 0.1)})
    with pytest.raises(FormatError, match="'d' has non-finite values"):
        pack("Q4_0", {**g, "d": torch.full_like(g["d"], float("inf"))})
    with pytest.raises(FormatError, match="fields must be a dict"):
        pack("Q4_0", [g["q"], g["d"]])


def test_unpack_errors():
    raw = pack("Q6_K", _random_fields("Q6_K"))
    with pytest.raises(FormatError, match="row length .* 500 is not a positive multiple of its "
                                          "block size 256"):
        unpack("Q6_K", raw, 500)
    with pytest.raises(FormatError, match=r"420 bytes per row, expected 210 \(1 blocks of 210"):
        unpack("Q6_K", raw, 256)
    with pytest.raises(FormatError, match="must be uint8"):
        unpack("Q6_K", raw.astype(np.int16), 512)
    with pytest.raises(FormatError, match="must be 2-D"):
        unpack("Q6_K", raw.reshape(3, 2, -1), 512)
    with pytest.raises(FormatError, match="n_cols must be an int"):
        unpack("Q6_K", raw, 512.0)
    nv = pack("NVFP4", _random_fields("NVFP4"))
    nv[0, 0] = 0x7F  # ggml's second zero: never written by ggml_fp32_to_ue4m3
    with pytest.raises(FormatError, match=r"NVFP4: field 'sc' has values in \[.*, 127\], "
                                          r"expected 0\.\.126"):
        unpack("NVFP4", nv, 128)
    bad = pack("Q8_0", _random_fields("Q8_0"))
    bad[0, :2] = [0x00, 0x7C]  # float16 +inf
    with pytest.raises(FormatError, match="'d' has non-finite values"):
        unpack("Q8_0", bad, 64)
