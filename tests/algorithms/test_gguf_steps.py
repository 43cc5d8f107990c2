"""The ``imatrix``, ``gptq`` and ``awq`` steps on a model whose weights are GGUF block types.

A tiny Llama whose widths are multiples of 256 (hidden 256, intermediate 512, 2 layers,
vocab 128), its norms given uneven per-channel gains so that the channels of the linears'
inputs differ in size (as in trained models): the importance-weighted steps must lower the
logits' error against the data-free rounding on held-out calibration-like tokens, and every
quantized weight must reproduce through the exporter's path
(:func:`lowbit.export.base.weight_qtensor`) bit for bit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lowbit.core.ggml")
tf = pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.config.recipe import Recipe  # noqa: E402
from lowbit.core import dequantize, fake_quant  # noqa: E402
from lowbit.errors import CalibrationError, ConfigError  # noqa: E402
from lowbit.export.base import quantized_modules, weight_qtensor  # noqa: E402

VOCAB = 128
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
HELD = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))


def _model():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    m = tf.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=g)))
    return m


def _recipe(fmt: str, steps: list | None = None) -> Recipe:
    return Recipe.parse({"name": f"t-{fmt}", "targets": [
        {"pattern": "*layers*", "weight": {"format": fmt}}],
        "algorithms": steps or []})


@pytest.fixture(scope="module")
def ref():
    with torch.no_grad():
        return _model()(HELD).logits


def _run(fmt, steps, ref, **kw):
    m = lowbit.quantize(_model(), _recipe(fmt, steps), calib_data=CALIB, **kw)
    with torch.no_grad():
        err = float((m(HELD).logits - ref).square().mean())
    return m, err


def _reproduces(m) -> int:
    """Every quantized weight: the exporter's QTensor dequantizes to the fake-quantized
    weight; fixed scales (set by a step) keep the weight on their grid. Returns how many
    carried fixed scales."""
    n_fixed = 0
    for name, mod in quantized_modules(m):
        if not mod.weight_quantizer.is_enabled:
            continue
        qt = weight_qtensor(mod)
        wq = mod.quantized_weight().detach()
        assert torch.equal(dequantize(qt).reshape(wq.shape), wq), name
        q = mod.weight_quantizer
        if q.scale is not None:
            n_fixed += 1
            again = fake_quant(mod.weight_2d().detach(), q.spec, scale=q.scale,
                               zero_point=q.zero_point, global_scale=q.global_scale)
            assert torch.equal(again, mod.weight_2d().detach().float()) or \
                torch.equal(again, fake_quant(again, q.spec, scale=q.scale,
                                              zero_point=q.zero_point,
                                              global_scale=q.global_scale)), name
    return n_fixed


@pytest.mark.parametrize("fmt", ["gguf_q4_k", "gguf_q3_k"])
def test_imatrix_and_gptq_steps_lower_the_error(fmt, ref):
    _, base = _run(fmt, [], ref)
    m_imat, imat = _run(fmt, [{"name": "imatrix"}], ref)
    m_gptq, gptq = _run(fmt, [{"name": "gptq"}], ref)
    assert imat < base, (imat, base)
    assert gptq < imat, (gptq, imat)
    assert _reproduces(m_imat) == 14  # 2 blocks x 7 linears
    assert _reproduces(m_gptq) == 14
    rows = m_imat.lowbit_report.blocks
    assert rows[0]["imatrix_tokens"]["self_attn.q_proj"] == CALIB.numel()


def test_imatrix_without_data_names_the_fix():
    with pytest.raises(CalibrationError, match="imatrix"):
        lowbit.quantize(_model(), _recipe("gguf_q4_k", [{"name": "imatrix"}]))
    with pytest.raises(ConfigError, match="no weight with one"):
        lowbit.quantize(_model(), Recipe.parse({"name": "t", "algorithms": [
            {"name": "imatrix"}], "targets": [{"pattern": "*", "weight": {
                "format": "int4", "granularity": "group", "group_size": 32}}]}),
            calib_data=CALIB)


def test_imatrix_file_sets_the_scales_without_data(tmp_path):
    pytest.importorskip("lowbit.adapters.gguf_names")
    from lowbit.adapters.gguf_names import gguf_tensor_names
    from lowbit.calib.imatrix_file import write_imatrix
    from lowbit.core.ggml import search_scales

    m = _model()
    g = torch.Generator().manual_seed(5)
    names = {mod: t for mod, t in gguf_tensor_names(m).items() if ".layers." in mod}
    data = {t.name: (torch.rand(1, t.n_cols, generator=g) * 10, torch.tensor([10.0]))
            for t in names.values()}
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, data, dataset="test", chunks=1, chunk_size=32)
    q = lowbit.quantize(m, _recipe("gguf_q4_k", [{"name": "imatrix",
                                                    "args": {"file": str(path)}}]))
    for mod, t in names.items():
        wq = q.get_submodule(mod).weight_quantizer
        s, z, gs = search_scales(q.get_submodule(mod).weight_2d().detach().float(), "Q4_K",
                                 data[t.name][0][0] / 10)
        assert torch.equal(wq.scale, s), mod
    assert _reproduces(q) == 14
    # a file after another step is refused (its statistics are of the original weights)
    with pytest.raises(ConfigError, match="before"):
        lowbit.quantize(_model(), _recipe("gguf_q4_k", [
            {"name": "gptq"}, {"name": "imatrix", "args": {"file": str(path)}}]),
            calib_data=CALIB)


def test_awq_runs_on_gguf_without_clip(ref):
    m, err = _run("gguf_q4_k", [{"name": "awq", "args": {"guard": False, "grid": 3,
                                                      "max_tokens": 64, "pairs": False}}], ref)
    notes = [n for r in m.lowbit_report.blocks for n in r.get("notes", [])]
    assert any("no clip search" in n for n in notes)
    assert all(not r["awq_clip"] for r in m.lowbit_report.blocks)
    _reproduces(m)
    assert err == err  # finite


def test_legacy_types_on_hidden_64_models():
    """Q5_0 / IQ4_NL (blocks of 32) on the tests' hidden-64 Llama: GPTQ beats data-free."""
    from tests.tiny_models import build

    with torch.no_grad():
        ref64 = build("llama")(HELD % 128).logits
    for fmt in ("gguf_q5_0", "gguf_iq4_nl"):
        errs = []
        for steps in ([], [{"name": "gptq"}]):
            m = lowbit.quantize(build("llama"), _recipe(fmt, steps), calib_data=CALIB)
            with torch.no_grad():
                errs.append(float((m(HELD).logits - ref64).square().mean()))
            _reproduces(m)
        assert errs[1] < errs[0], (fmt, errs)


def test_imatrix_per_expert_counts():
    """MoE: each expert's importance comes from the tokens routed to it (llama.cpp counts
    per expert), whatever moe_calibrate_all_experts says."""
    from tests.moe_models import build_moe

    m = lowbit.quantize(build_moe("qwen3_moe"), _recipe("gguf_q4_0", [{"name": "imatrix"}]),
                        calib_data=CALIB % 128)
    rows = {r["block"]: r for r in m.lowbit_report.blocks}
    checked = 0
    for ex in m.lowbit_report.experts:
        block = ".".join(ex["name"].split(".")[:3])  # model.layers.N
        local = ex["name"][len(block) + 1:] + ".up_proj"
        got = rows[block].get("imatrix_tokens", {}).get(local, 0)
        assert got == ex["routed_tokens"], (ex, got)
        checked += 1
    assert checked >= 4
    _reproduces(m)


@pytest.mark.parametrize("fmt", ["gguf_q4_k", "gguf_q6_k"])
def test_gguf_file_holds_the_gptq_weights(tmp_path, ref, fmt):
    """The exporter writes GPTQ's weights: ggml's own dequantization (gguf package) of every
    tensor equals the fake-quantized weight (q/k rows are permuted by the exporter, as
    llama.cpp's rotary wants: compared after the same permutation)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from lowbit.adapters.gguf_names import gguf_tensor_names
    from lowbit.export.gguf import qk_rows

    m, _ = _run(fmt, [{"name": "gptq"}], ref)
    out = lowbit.save(m, tmp_path / "g", format="gguf")
    r = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in r.tensors}
    n = 0
    for mod, t in gguf_tensor_names(m).items():
        if ".layers." not in mod:
            continue
        got = torch.from_numpy(np.array(gguf.quants.dequantize(tensors[t.name].data,
                                                                tensors[t.name].tensor_type),
                                        dtype=np.float32))
        want = m.get_submodule(mod).quantized_weight().detach().float()
        if mod.endswith("q_proj"):
            want = want[qk_rows(want.shape[0], 4)]
        elif mod.endswith("k_proj"):
            want = want[qk_rows(want.shape[0], 2)]
        assert tensors[t.name].tensor_type.name == fmt[5:].upper(), t.name
        assert torch.equal(got.reshape(want.shape), want), t.name
        n += 1
    assert n == 14


def test_imatrix_reaches_the_output_layer(ref):
    """A gguf_* output layer (outside the decoder blocks) gets its importance from one more
    calibration pass, as llama-imatrix sees output.weight."""
    def rec(steps):
        return Recipe.parse({"name": "t", "exclude": ["*embed*"], "algorithms": steps,
                             "targets": [{"pattern": "*", "weight": {"format": "gguf_q3_k"}}]})

    errs = []
    for steps in ([], [{"name": "imatrix"}]):
        m = lowbit.quantize(_model(), rec(steps), calib_data=CALIB)
        with torch.no_grad():
            errs.append(float((m(HELD).logits - ref).square().mean()))
    assert m.lowbit_report.blocks[-1] == {"block": "(outside the blocks)",
                                          "imatrix_tokens": {"lm_head": CALIB.numel()}}
    assert m.lm_head.weight_quantizer.scale is not None
    assert _reproduces(m) == 15
    assert errs[1] < errs[0], errs
