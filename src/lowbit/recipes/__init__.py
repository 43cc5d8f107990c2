"""Preset recipes shipped as YAML, and loading/saving of recipe files.

>>> from lowbit import recipes
>>> r = recipes.load("int4-weight-only", group_size=64)
>>> r.targets[0].weight.group_size
64
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lowbit._fs import chmod_as_umask

from lowbit.config.recipe import FORMAT_ALIASES, Recipe, _spec
from lowbit.core.blocks import get_block_format
from lowbit.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
OVERRIDES = ("group_size", "kv_cache", "calibrator", "strict", "group_policy", "exclude",
             "algorithms", "moe_calibrate_all_experts", "moe_min_tokens", "gguf_mix")

_FALLBACK_NOTE = ("output (and a tied token embedding) Q6_K, written by the GGUF exporter; a "
                  "layer whose width is not a multiple of 256 takes llama.cpp's fallback "
                  "(Q4_K -> Q5_0, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL...)")
#: llama-quantize mixes shipped as presets ``gguf-<ftype>`` (+ the variants below); the rules
#: are :mod:`lowbit.adapters.gguf_mix`'s (llama.cpp's llama_tensor_get_type)
GGUF_MIX_PRESETS = {
    "q2_k": "Q2_K with attn_v Q4_K (Q3_K below 4 query heads per KV head), ffn_down and "
            "attn_output Q3_K",
    "q3_k_m": "Q3_K with attn_v Q5_K in the first two layers then Q4_K, ffn_down and "
              "attn_output Q4_K",
    "q4_k_s": "Q4_K with attn_v Q5_K in the first four layers and ffn_down Q5_K in the first "
              "eighth",
    "q4_k_m": "Q4_K with attn_v and ffn_down Q6_K in the first and last eighth of the layers "
              "and every third layer between",
    "q5_k_m": "Q5_K with attn_v and ffn_down Q6_K in the first and last eighth of the layers "
              "and every third layer between",
    "q6_k": "Q6_K for every linear",
    "iq4_xs": "IQ4_XS (non-linear 4-bit codes, super-blocks of 256) with attn_v Q5_K at 4 or "
              "more query heads per KV head and, without an imatrix, ffn_down Q5_K in the "
              "first eighth",
    "iq4_nl": "IQ4_NL (non-linear 4-bit codes, blocks of 32) with attn_v Q5_K at 4 or more "
              "query heads per KV head and, without an imatrix, ffn_down Q5_K in the first "
              "eighth",
}
#: preset suffix -> (algorithm steps, what the variant does)
GGUF_MIX_VARIANTS = {
    "": ([], "Data-free: llama.cpp's own weighting of the scale search, no calibration."),
    "-imatrix": ([{"name": "imatrix"}], "Scales searched with an importance matrix from the "
                 "calibration activations (mean x^2 per input channel, as llama-imatrix); "
                 "needs --calib (or an imatrix step with args {file: imatrix.gguf})."),
    "-gptq": ([{"name": "gptq"}], "GPTQ: block types' scales searched first, then codes "
              "rounded column by column with the Hessian of the calibration inputs; needs "
              "--calib."),
    "-awq": ([{"name": "awq"}, {"name": "imatrix"}], "AWQ activation-aware scales folded "
             "into the preceding norms, then the block types' scales searched with the "
             "importance matrix of the calibration activations; needs --calib."),
}


def _mix_presets() -> dict[str, dict]:
    """``{name: recipe dict}`` of the generated ``gguf-<mix>[-variant]`` presets."""
    out = {}
    for ftype, what in GGUF_MIX_PRESETS.items():
        for suffix, (steps, how) in GGUF_MIX_VARIANTS.items():
            name = f"gguf-{ftype}{suffix}"
            out[name] = {"name": name, "gguf_mix": {"ftype": ftype},
                         "algorithms": [dict(a) for a in steps],
                         "description": f"llama.cpp's {ftype.upper()} mix, per tensor as "
                                        f"llama-quantize picks it: {what}; {_FALLBACK_NOTE}. "
                                        f"{how}"}
    return out


def names() -> list[str]:
    """Names of the preset recipes (YAML files and the generated GGUF mixes), sorted."""
    return sorted({p.stem for p in PRESET_DIR.glob("*.yaml")} | set(_mix_presets()))


def _preset(name: str) -> Recipe:
    gen = _mix_presets()
    if name in gen and not (PRESET_DIR / f"{name}.yaml").exists():
        return Recipe.parse(gen[name], f"preset {name}")
    return Recipe.parse(_read_yaml(PRESET_DIR / f"{name}.yaml"), f"preset {name}")


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None


def load(name_or_path: "str | os.PathLike | Recipe | dict", **overrides: Any) -> Recipe:
    """A preset by name, a YAML file by path, a dict or a Recipe, with overrides applied.

    Overrides: ``group_size`` (every grouped spec that is not a block format; a group size
    given here is the user's: a layer whose width it does not divide is a ConfigError naming
    the layer and the group sizes that would work, unless ``group_policy="fallback"`` is
    given too — a recipe's own group size falls back, see :class:`lowbit.config.Recipe`),
    ``kv_cache`` (``"fp8"``, ``"int8"``, a spec dict or None), ``calibrator`` (every static
    activation spec), ``strict``, ``group_policy``, ``exclude`` (replaces the list),
    ``algorithms`` (replaces the steps), ``moe_calibrate_all_experts`` and
    ``moe_min_tokens`` (MoE calibration, see :class:`lowbit.config.Recipe`), ``gguf_mix``
    (a dict merged into the recipe's llama-quantize mix, e.g. ``{"output_type": "q8_0"}``;
    a recipe without a mix needs ``ftype`` in it; see :class:`lowbit.config.recipe.GgufMix`).
    """
    if isinstance(name_or_path, Recipe):
        recipe = name_or_path
    elif isinstance(name_or_path, dict):
        recipe = Recipe.parse(name_or_path)
    else:
        s = str(name_or_path)
        p = Path(s)
        if s in names():
            recipe = _preset(s)
        elif p.suffix in (".yaml", ".yml") or p.exists():
            if not p.is_file():
                raise ConfigError(f"recipe file {s} does not exist")
            recipe = Recipe.parse(_read_yaml(p), s)
        else:
            raise ConfigError(f"unknown recipe {s!r}; expected a YAML file or one of: "
                              f"{', '.join(names())}")
    return apply_overrides(recipe, **overrides) if overrides else recipe


def takes_group_size(recipe: "str | os.PathLike | Recipe | dict") -> bool:
    """Whether a ``group_size`` override changes ``recipe``: it has a spec with ``group``
    granularity that is not a block format (NVFP4/MX blocks are fixed by the format)."""
    r = recipe if isinstance(recipe, Recipe) else load(recipe)
    for t in r.targets:
        for s in (t.weight, t.input, t.output):
            if s is not None and s.granularity == "group" and \
                    get_block_format(s.format) is None:
                return True
    return False


def apply_overrides(recipe: Recipe, **overrides: Any) -> Recipe:
    """A copy of ``recipe`` with load-time overrides (see :func:`load`)."""
    bad = [k for k in overrides if k not in OVERRIDES]
    if bad:
        raise ConfigError(f"unknown recipe override {bad[0]!r}; expected one of: "
                          f"{', '.join(OVERRIDES)}")
    d = recipe.to_dict()
    gs = overrides.get("group_size")
    cal = overrides.get("calibrator")
    if gs is not None and not takes_group_size(recipe):
        raise ConfigError(
            f"recipe {recipe.name} has no grouped integer/float spec whose group size could be "
            f"set (its specs are per tensor/channel/token, or block formats with a fixed "
            f"block): group_size={gs} would be ignored; drop it or use a grouped recipe")
    for t in d["targets"]:
        for role in ("weight", "input", "output"):
            s = t.get(role)
            if not s:
                continue
            if gs is not None and s.get("granularity") == "group" and \
                    get_block_format(s["format"]) is None:
                s["group_size"] = int(gs)
            if cal is not None and role != "weight" and not s.get("dynamic"):
                s["calibrator"] = cal
    if "kv_cache" in overrides:
        d["kv_cache"] = kv_cache_spec(overrides["kv_cache"])
    if overrides.get("gguf_mix") is not None:
        mix = overrides["gguf_mix"]
        mix = {"ftype": mix} if isinstance(mix, str) else dict(mix)
        if d.get("gguf_mix") is None and "ftype" not in mix:
            raise ConfigError(f"recipe {recipe.name} has no gguf_mix: the gguf_mix override "
                              f"{mix} needs an ftype (e.g. q4_k_m) to start one")
        d["gguf_mix"] = {**(d.get("gguf_mix") or {}), **mix}
    if gs is not None and "group_policy" not in overrides:
        d["group_policy"] = "strict"  # the user asked for this group size: no fallback
    for k in ("strict", "group_policy", "exclude", "algorithms", "moe_calibrate_all_experts",
              "moe_min_tokens"):
        if k in overrides:
            d[k] = overrides[k]
    if overrides:
        d["name"] = recipe.name
    return Recipe.parse(d, f"recipe {recipe.name}")


def kv_cache_spec(v: Any) -> dict | None:
    """``"fp8"``/``"int8"``/a format name/a dict -> a KV-cache spec dict (per-tensor static);
    the shorthands ``"int4"`` and ``"nvfp4"`` mean what they mean in a recipe
    (:data:`lowbit.config.recipe.KV_SHORTHANDS`)."""
    from lowbit.config.recipe import KV_SHORTHANDS

    if v is None or v == "none":
        return None
    if isinstance(v, str) and v in KV_SHORTHANDS:
        return dict(KV_SHORTHANDS[v])
    if isinstance(v, str):
        return {"format": FORMAT_ALIASES.get(v, v), "granularity": "tensor"}
    if isinstance(v, dict):
        return v
    return _spec(v, "kv_cache").model_dump(exclude_defaults=True)


def save(recipe: Recipe, path: "str | os.PathLike") -> Path:
    """Write ``recipe`` as YAML to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        chmod_as_umask(tmp)  # mkstemp makes 0600; a server running as another user reads it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["Recipe", "load", "names", "save", "apply_overrides", "takes_group_size", "kv_cache_spec", "PRESET_DIR"]
