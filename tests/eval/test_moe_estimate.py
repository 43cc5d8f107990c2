"""`lowbit estimate` for MoE configs: total and active parameters and weight memory, from a
config.json alone."""

import pytest

from lowbit.eval.memory import arch_from_config, estimate
from tests.moe_models import MOE_FAMILIES, _config, build_moe

tf = pytest.importorskip("transformers")


def _arch(cfg, tmp_path):
    cfg.save_pretrained(tmp_path)
    return arch_from_config(tmp_path)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tiny_config_counts_the_built_model(family, tmp_path):
    """Total parameters from the config agree with the model built from it (biases and
    q/k norms, which the estimate ignores, are < 1.5% of these tiny models)."""
    a = _arch(_config(family)[0], tmp_path)
    real = sum(p.numel() for p in build_moe(family).parameters())
    assert a.is_moe and a.top_k == 2 and a.experts == 4
    assert abs(a.params() - real) / real < 0.015
    # active: the 2 unused experts of each MoE layer are left out, nothing else
    assert a.params() - a.active_params() == a.moe_layers * 2 * 3 * 64 * 64


REAL = {  # published totals / active, in billions
    "mixtral-8x7b": (lambda: tf.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2), 46.7, 12.9),
    "qwen3-30b-a3b": (lambda: tf.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False), 30.5, 3.3),
    "deepseek-v3": (lambda: tf.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, tie_word_embeddings=False), 671, 37),
}


@pytest.mark.parametrize("name", list(REAL))
def test_realistic_sizes(name, tmp_path):
    make, total, active = REAL[name]
    a = _arch(make(), tmp_path)
    assert abs(a.params() / 1e9 - total) / total < 0.01
    assert abs(a.active_params() / 1e9 - active) / active < 0.03
    est = estimate(a.params(), a)
    rows = {r["precision"]: r for r in est["weights"]}
    assert est["moe"]["active_params"] == a.active_params()
    # int4 with fp16 scales per 128: 4.125 bits per weight, resident and per token
    assert rows["int4"]["total"] == pytest.approx(a.params() * 4.125 / 8)
    assert rows["int4"]["active_total"] == pytest.approx(a.active_params() * 4.125 / 8)
    assert rows["fp16"]["active_total"] == pytest.approx(2 * a.active_params())


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_known_moe_names_match_their_configs(name, tmp_path):
    from lowbit.eval.memory import KNOWN

    a = _arch(REAL[name][0](), tmp_path)
    assert (KNOWN[name].params(), KNOWN[name].active_params()) == \
        (a.params(), a.active_params())


def test_dense_config_has_no_moe_section(tmp_path):
    a = _arch(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=100), tmp_path)
    assert not a.is_moe and a.active_params() == a.params()
    assert "moe" not in estimate(a.params(), a)


def test_cli_prints_total_and_active(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lowbit.cli import app

    REAL["mixtral-8x7b"][0]().save_pretrained(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    r = CliRunner().invoke(app, ["estimate", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "46.70B parameters (12.88B active per token)" in r.output
    assert "active/token GB" in r.output and "8 experts, top-2, in 32 of 32 layers" in r.output
    assert "6.64" in r.output  # int4 weights read per token, GB


def test_experts_without_top_k_is_refused(tmp_path):
    import json

    from lowbit.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_local_experts": 8}))
    with pytest.raises(ConfigError, match="8 experts but no num_experts_per_tok"):
        arch_from_config(tmp_path)
