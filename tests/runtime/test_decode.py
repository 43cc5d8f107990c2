"""FastDecoder: lowbit's lean greedy loop computes what the model's own forward computes."""

import pytest
import torch
import transformers as tf

import lowbit
import lowbit.runtime as rt
from lowbit.errors import ConfigError
from lowbit.runtime import FastDecoder, fuse_linears
from tests.tiny_models import build, calib_ids, loop_over


def wide(family="llama", dtype=torch.float32, **kw):
    """A tiny model whose projections are multiples of 64 wide (k/v 64: fusable int4)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, **kw)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    return cls[1](cls[0](**cfg)).to(dtype).eval()


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def hf_greedy(m, ids, n):
    # an explicit mask: generate would otherwise mask prompt tokens equal to pad_token_id
    return m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_float_logits_and_tokens_match_the_model(family):
    m = build(family)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = m(ids).logits[0]
        dec = FastDecoder(m)
        assert {L.qkv.mode for L in dec.layers} == {"float"}
        whole = dec.forward(ids[0], 0, all_logits=True)
        assert rel(whole, ref) < 1e-5
        # a prompt in two chunks, then token by token: the cache and the offset mask
        a = dec.forward(ids[0, :7], 0, all_logits=True)
        b = dec.forward(ids[0, 7:], 7, all_logits=True)
        assert rel(torch.cat([a, b]), ref) < 1e-5
        for i in range(12):
            assert rel(dec.forward(ids[0, i:i + 1], i), ref[i]) < 1e-5
        assert torch.equal(dec.generate(ids, 16), hf_greedy(m, ids, 16))


def test_qwen2_biases_fused():
    m = wide("qwen2")
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        dec = FastDecoder(m)
        assert dec.layers[0].qkv.bias is not None
        assert rel(dec.forward(ids[0], 0, all_logits=True), m(ids).logits[0]) < 1e-5


@pytest.mark.parametrize("recipe,kernel", [("int4-weight-only", "int4_weight_only"),
                                           ("int8-weight-only", "int8_weight_only"),
                                           ("int8-dynamic", "w8a8_int8")])
def test_packed_projections_fused_and_shared(recipe, kernel):
    m = wide()
    lowbit.quantize(m, recipe, forward_loop=loop_over(calib_ids(2, 16)),
                    **({"group_size": 64} if "int4" in recipe else {}))
    kern = rt.convert(m)
    assert kern[kernel] == 14
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = m(ids).logits[0]
        dec = FastDecoder(m)
        L = dec.layers[0]
        assert L.qkv.mode == L.gate_up.mode == "packed"
        assert L.qkv.layer.out_features == 128 + 64 + 64
        # the model's layers now read row views of the fused weight: no second copy
        attn = m.model.layers[0].self_attn
        name = "w_packed" if "int4" in recipe else "w_int8"
        fused_w = getattr(L.qkv.layer, name)
        assert getattr(attn.k_proj, name).untyped_storage().data_ptr() == \
            fused_w.untyped_storage().data_ptr()
        assert torch.equal(m(ids).logits[0], before)  # the model still computes the same
        got = dec.forward(ids[0], 0, all_logits=True)
        # the fused matmul is the same kernel over the same rows: same outputs, so the rest
        # (float32 here) agrees to rounding
        assert rel(got, before) < 1e-5
        # decode steps (one row: torch's kernel rounds differently than for a prompt) match
        # generate's step logits; greedy tokens match up to a near-tie of generate's logits
        g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                       min_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
                       return_dict_in_generate=True)
        new = g.sequences[0, 10:]
        step = dec.forward(ids[0], 0)
        for i, lg in enumerate(g.logits):
            assert rel(step, lg[0]) < 1e-5
            step = dec.forward(new[i:i + 1], 10 + i)
        ours = dec.generate(ids, 12)[0, 10:]
        diff = (ours != new).nonzero()
        if len(diff):
            j = int(diff[0])
            top = g.logits[j][0].topk(2).values
            assert float(top[0] - top[1]) < 1e-3 * float(top[0].abs())
    extra = dec.extra_nbytes()
    if "int4" in recipe:  # group scales are copied: [G, out, 2] bf16 per fused layer
        layers, groups, values, nbytes = 2, 128 // 64, 2, 2
        assert extra == layers * groups * values * nbytes * (256 + 512)
    elif kernel == "w8a8_int8":  # float32 weight scales and the GEMV's bf16 ones are copied
        assert extra == 2 * (4 + 2) * (256 + 512)
    else:
        assert extra == 0


def test_bfloat16_model_agrees():
    m = wide()
    lowbit.quantize(m, "int4-weight-only", group_size=64)
    rt.convert(m)
    m = m.to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = m(ids).logits[0]
        dec = FastDecoder(m)
        got = dec.forward(ids[0], 0, all_logits=True)
        dec.forward(ids[0, :9], 0)
        step = dec.forward(ids[0, 9:], 9)  # one row: the float head runs as torch.mv
    assert got.dtype == torch.bfloat16
    assert rel(got, ref) < 2e-2  # bf16 rounding (RMSNorm in one fused op)
    assert rel(step, ref[9]) < 2e-2


def test_fuse_falls_back_to_split_for_mixed_layers():
    m = wide()
    a = m.model.layers[0].self_attn
    d = lowbit.recipes.load("int4-weight-only", group_size=64).to_dict()
    d["targets"].append({"pattern": "*k_proj", "weight": {"format": "int8",
                                                         "granularity": "channel"}})
    lowbit.quantize(m, lowbit.recipes.load(d), forward_loop=loop_over(calib_ids(2, 16)))
    rt.convert(m)
    f = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
    assert f.mode == "split"
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(f(x), torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1))


def test_eos_stops_and_bad_input():
    m = build("llama")
    dec = FastDecoder(m)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    full = dec.generate(ids, 8)
    eos = int(full[0, 5 + 2])  # the third new token
    first = next(i for i in range(8) if int(full[0, 5 + i]) == eos)
    out = dec.generate(ids, 8, eos_token_id=[eos])
    assert out.shape[1] == 5 + first + 1 and int(out[0, -1]) == eos
    with pytest.raises(ConfigError, match=r"one sequence of token ids"):
        dec.generate(torch.zeros(2, 5, dtype=torch.long), 4)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        dec.generate(ids, 0)
    # the module-level helper builds one decoder per model and reuses it
    assert torch.equal(rt.generate(m, ids, 8), full)
    assert rt.generate(m, ids, 4).shape[1] == 9


def test_unsupported_models_are_refused():
    with pytest.raises(ConfigError, match=r"supports model_type llama, mistral, qwen2, .*; got "
                                          r"'gpt2'"):
        FastDecoder(build("gpt2"))
    # (a Mistral sequence longer than its sliding window is decoded now:
    # tests/runtime/test_decode_families.py)


def test_tensor_subclass_weights_are_not_concatenated():
    # e.g. torchao's int8 weights: no aten.cat / mv for them; called layer by layer
    from torch.testing._internal.two_tensor import TwoTensor

    a, b = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=False)
    a.weight = torch.nn.Parameter(TwoTensor(a.weight.data, a.weight.data.clone()),
                                  requires_grad=False)
    f = fuse_linears([a, b])
    assert f.mode == "split"


def test_fast_decoder_refuses_a_quantized_kv_cache():
    """FastDecoder's cache is float: a model whose KV cache is fake-quantized is refused
    rather than decoded as if it were not."""
    import lowbit
    from lowbit.errors import ConfigError
    from lowbit.runtime.decode import FastDecoder
    from tests.tiny_models import build, calib_ids, loop_over

    model = build("llama")
    lowbit.quantize(model, "kv-int4", forward_loop=loop_over(calib_ids()))
    with pytest.raises(ConfigError, match="quantizes its KV cache"):
        FastDecoder(model)


@pytest.mark.parametrize("recipe,dtype,tol", [
    (None, torch.float32, 1e-5),
    # bfloat16: inductor keeps float32 between the ops it fuses where eager rounds each op's
    # output to bfloat16 (a few ulps of the largest logit)
    ("int4-weight-only", torch.bfloat16, 2 ** -6),
    # a 1e-7 difference in the attention output can move a per-token int8 activation by
    # one step (docs/runtime.md: W8A8 agrees to ~1e-2 per model)
    ("int8-dynamic", torch.float32, 2e-2)])
def test_compiled_step_matches_the_eager_step(recipe, dtype, tol):
    from lowbit.hardware import hardware_path_report, reset_hardware_paths
    from lowbit.runtime.decode import CACHE_BUCKET, COMPILE_PATH
    reset_hardware_paths()
    m = wide()
    if recipe is not None:
        lowbit.quantize(m, recipe, **({"group_size": 64} if "int4" in recipe else {}))
        rt.convert(m)
    m = m.to(dtype)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        eager = FastDecoder(m)
        comp = FastDecoder(m, compile=True)
        want = eager.generate(ids, 12)
        got = comp.generate(ids, 12)
        assert hardware_path_report()[COMPILE_PATH] == "hardware"
        assert comp.cache_len == CACHE_BUCKET and eager.cache_len == 22
        assert torch.equal(got, want)
        # step by step: the same logits (the captured step computes the same function)
        a, b = eager.forward(ids[0], 0), comp.forward(ids[0], 0)
        for i, tok in enumerate(want[0, 10:]):
            assert rel(b, a) < tol
            a, b = eager.forward(tok[None], 10 + i), comp.forward(tok[None], 10 + i)


def test_compiled_decoders_keep_their_own_graphs():
    """The captured step drops dynamo's guards on the weights (they cannot change within one
    decoder); two decoders of different kernels in one process must still each run their
    own graph (a shared graph read the other's buffers: KeyError 'w_int8', found in the
    bench)."""
    from lowbit.hardware import hardware_path_report, reset_hardware_paths
    from lowbit.runtime.decode import COMPILE_PATH
    reset_hardware_paths()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for recipe in ("int8-weight-only", "int4-weight-only", None):
            m = wide()
            if recipe is not None:
                lowbit.quantize(m, recipe, **({"group_size": 64} if "int4" in recipe else {}))
                rt.convert(m)
            m = m.to(torch.bfloat16)
            comp = FastDecoder(m, compile=True)
            a, b = FastDecoder(m).forward(ids[0], 0), comp.forward(ids[0], 0)
            for i in range(3):
                a = FastDecoder(m).forward(ids[0, :i + 1], 0)
                b = comp.forward(ids[0, i:i + 1], i)
                assert rel(b, a) < 2 ** -5, recipe
            assert hardware_path_report()[COMPILE_PATH] == "hardware", recipe


def test_compile_failure_falls_back_to_the_eager_step(monkeypatch):
    from lowbit.hardware import HardwareFallbackWarning, hardware_path_report
    from lowbit.runtime.decode import COMPILE_PATH

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    m = wide()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = FastDecoder(m).generate(ids, 5)
        dec = FastDecoder(m, compile=True)
        with pytest.warns(HardwareFallbackWarning, match="no C\\+\\+ compiler"):
            got = dec.generate(ids, 5)
    assert torch.equal(got, want) and not dec.compile
    assert hardware_path_report()[COMPILE_PATH].startswith("fallback: the eager decode step")
