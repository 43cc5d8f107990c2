"""GGUF export reads the family's facts from its adapter (lowbit.adapters.facts): the norm
kind (``1 + w`` norms written as ``w + 1``), the text config of a multimodal class, and the
config fields transformers' forward ignores (a soft-cap llama.cpp would apply is refused)."""

import warnings

import pytest
import torch

import lowbit
from lowbit.adapters import facts
from lowbit.errors import ConfigError
from tests.tiny_models import build

gguf = pytest.importorskip("gguf")


def _model(family):
    m = build(family)
    cfg = facts.text_config(m)
    if getattr(cfg, "query_pre_attn_scalar", None) is not None:  # as llama.cpp scales
        cfg.query_pre_attn_scalar = cfg.head_dim
        for mod in m.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "scaling"):
                mod.scaling = cfg.head_dim ** -0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(m, "gguf-q8_0")
    return m


def _norm(path, name="output_norm.weight"):
    r = gguf.GGUFReader(str(path / "model.gguf"))
    t = next(t for t in r.tensors if t.name == name)
    return torch.from_numpy(t.data.copy()).float()


def test_multimodal_final_softcap_that_transformers_ignores_is_refused(tmp_path):
    m = _model("gemma3_mm")
    m.config.text_config.final_logit_softcapping = 30.0
    assert facts.ignored_config(m)["final_logit_softcapping"] == 30.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match=r"final_logit_softcapping = 30.0 is set, but "
                                              r"Gemma3ForConditionalGeneration.*gemma3_mm"):
            lowbit.save(m, tmp_path / "a", format="gguf")
    assert not (tmp_path / "a").exists()
    m.config.text_config.final_logit_softcapping = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.save(m, tmp_path / "b", format="gguf")
    r = gguf.GGUFReader(str(tmp_path / "b" / "model.gguf"))
    assert "gemma3.final_logit_softcapping" not in r.fields


def test_norm_offset_comes_from_the_adapter(tmp_path, monkeypatch):
    m = _model("gemma2")
    w = m.model.norm.weight.detach().float()
    lowbit.save(m, tmp_path / "a", format="gguf")
    assert torch.equal(_norm(tmp_path / "a"), w + 1.0)  # declared "1+w": written w + 1
    monkeypatch.setattr(facts, "norm_offset", lambda model, measure=False: 0.0)
    lowbit.save(m, tmp_path / "b", format="gguf")
    assert torch.equal(_norm(tmp_path / "b"), w)


def test_undeclared_norm_kind_is_measured():
    m = build("olmo2")  # its adapter declares no norm kind (post-norms, no smoothing groups)
    assert facts.norm_offset(m) is None
    assert facts.norm_offset(m, measure=True) == 0.0
    g = build("gemma2")
    assert facts.norm_offset(g) == facts.norm_offset(g, measure=True) == 1.0
