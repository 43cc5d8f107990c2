"""``Recipe``: which layers get which quantization, in which order, with which algorithms.

A recipe maps ordered name patterns to specs for a module's ``weight``, ``input`` and
``output``; later matching entries win, role by role (an entry only overrides the roles it
names; ``null`` switches a role off). Patterns are fnmatch wildcards matched against the
full module name (``model.layers.0.self_attn.q_proj``), or against its tail after a dot (so
``q_proj`` and ``*.mlp.*`` work), or regular expressions written ``re:...`` (searched).

YAML::

    name: int4-weight-only
    targets:
      - pattern: "*"
        weight: {format: int4, granularity: group, group_size: 128}
    exclude: ["*lm_head", "*embed*"]
    kv_cache: fp8            # optional: fp8 | int8 | int4 | nvfp4 | a spec (see KV_SHORTHANDS)
    algorithms: []           # ordered steps, e.g. [{name: gptq, args: {...}}]
    group_policy: fallback   # or strict
    strict: false            # true: a pattern that matches nothing, or a recipe that
                             # targets every linear but leaves > 2% of the non-embedding
                             # weights unquantized, is an error (else a warning)
    moe_calibrate_all_experts: null  # MoE: during calibration every token also passes
                             # through every expert (statistics only; the block's output
                             # keeps the model's routing). null: on when the recipe has
                             # algorithm steps (see Recipe.calibrate_all_experts)
    moe_min_tokens: null     # MoE: an expert routed fewer calibration tokens is named in the
                             # report with its fallback (null: the expert's input width)
    gguf_mix: null           # llama-quantize's per-tensor types, e.g. q4_k_m or
                             # {ftype: q4_k_m, output_type: null, embedding_type: null,
                             #  pure: false, imatrix: null} (see GgufMix)

``group_policy`` applies to group sizes written in the recipe: ``fallback`` uses the largest
divisor of a layer's width below the group size (every such layer is listed in the report
and named in one warning), ``strict`` raises. A ``group_size`` given explicitly as an
override (``lowbit.quantize(..., group_size=64)``, ``--group-size 64``) is strict unless
``group_policy`` is given with it.

MoE routers are excluded by default unless a target names them (see :meth:`Recipe.names_module`
and :mod:`lowbit.nn.routers`).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from lowbit.core import QuantSpec
from lowbit.errors import ConfigError

ROLES = ("weight", "input", "output")
FORMAT_ALIASES = {"fp8": "fp8_e4m3", "fp4": "fp4_e2m1", "fp6": "fp6_e3m2"}
DEFAULT_EXCLUDE = ["*lm_head", "*embed*", "*wte", "*wpe"]
# ``kv_cache:`` names that mean more than a bare format. Keys/values are [batch, kv_heads,
# seq, head_dim]: a 4-bit per-tensor static scale would be useless, so ``int4`` is one
# dynamic asymmetric scale per token and head (the head_dim values: QuaRot's KV scheme), and
# ``nvfp4`` its own E4M3 scale per 16 values of a head with a calibrated per-tensor FP32
# scale (a dynamic per-tensor one would change the scale of entries already in the cache).
# Other strings (``fp8``, ``int8``, a format name) are that format, per-tensor static.
KV_SHORTHANDS = {
    "int4": {"format": "int4", "granularity": "token", "dynamic": True, "symmetric": False},
    "nvfp4": {"format": "nvfp4"},
}


def _spec(v: Any, where: str) -> QuantSpec | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = {"format": v}
    if isinstance(v, dict) and v.get("format") in FORMAT_ALIASES:
        v = {**v, "format": FORMAT_ALIASES[v["format"]]}
    return QuantSpec.parse(v, where)


class Target(BaseModel):
    """One ordered entry of a recipe: a pattern and the specs of the roles it sets."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    pattern: str | list[str]
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None

    @property
    def patterns(self) -> list[str]:
        """The patterns of this entry as a list."""
        return [self.pattern] if isinstance(self.pattern, str) else list(self.pattern)

    def roles_set(self) -> list[str]:
        """Roles this entry names (explicit ``null`` included)."""
        return [r for r in ROLES if r in self.model_fields_set]


class AlgorithmStep(BaseModel):
    """One algorithm step (``smoothquant``, ``awq``, ``gptq``...) with its arguments."""

    model_config = ConfigDict(extra="forbid")

    name: str
    args: dict[str, Any] = {}
    targets: list[str] | None = None


class GgufMix(BaseModel):
    """A llama-quantize mix (``Q4_K_M``...) named by a recipe (``gguf_mix:``).

    At quantize time (:func:`lowbit.pipeline.quantize.quantize`) it becomes one weight spec
    per linear (format ``gguf_<type>``, the type llama.cpp's rules give its tensor,
    :func:`lowbit.adapters.gguf_mix.plan`) placed before the recipe's own ``targets`` (which
    still override, like llama-quantize's ``--tensor-type``). ``ftype``: the file type
    (``q4_k_m``, llama-quantize's spelling accepted too); ``output_type`` /
    ``embedding_type``: llama-quantize's ``--output-tensor-type`` / ``--token-embedding-type``
    (a ggml type name, ``q8_0``, ``f16``...; null: the mix's rule); ``pure``: ``--pure``
    (every tensor the default type, fallbacks still apply); ``imatrix``: whether llama.cpp's
    rules see an importance matrix (null: whether the recipe has an ``imatrix`` or ``gptq``
    step). The
    token embedding and output types are for the GGUF exporter (lowbit's model keeps them in
    float): the plan is in ``model.lowbit_report.gguf_mix``."""

    model_config = ConfigDict(extra="forbid")

    ftype: str
    output_type: str | None = None
    embedding_type: str | None = None
    pure: bool = False
    imatrix: bool | None = None

    @property
    def type(self) -> str:
        """Alias of :attr:`ftype` (the file type, ``"q4_k_m"``)."""
        return self.ftype

    @field_validator("ftype")
    @classmethod
    def _ftype(cls, v):
        from lowbit.adapters.gguf_mix import canonical_ftype  # llama.cpp's table lives there

        try:
            return canonical_ftype(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("output_type", "embedding_type")
    @classmethod
    def _tensor_type(cls, v, info):
        if v is None:
            return v
        from lowbit.adapters.gguf_mix import canonical_type

        try:
            return canonical_type(v, info.field_name).lower()
        except ConfigError as e:
            raise ValueError(str(e)) from None


class Recipe(BaseModel):
    """A whole quantization recipe; build with :func:`lowbit.recipes.load` or ``parse``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = "custom"
    description: str = ""
    targets: list[Target] = []
    exclude: list[str] = list(DEFAULT_EXCLUDE)
    kv_cache: QuantSpec | None = None
    algorithms: list[AlgorithmStep] = []
    group_policy: Literal["strict", "fallback"] = "fallback"
    strict: bool = False
    moe_calibrate_all_experts: bool | None = None
    moe_min_tokens: int | None = None
    gguf_mix: GgufMix | None = None
    feed: Literal["quantized", "fp"] | None = None

    @field_validator("gguf_mix", mode="before")
    @classmethod
    def _mix(cls, v):
        return {"ftype": v} if isinstance(v, str) else v

    @field_validator("moe_min_tokens")
    @classmethod
    def _min_tokens(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"must be a token count >= 0 or null, got {v}")
        return v

    @property
    def calibrate_all_experts(self) -> bool:
        """Whether calibration passes run every token through every expert of MoE blocks:
        ``moe_calibrate_all_experts`` when given, else whether the recipe has algorithm
        steps (their statistics, Hessians and scale searches are per expert)."""
        if self.moe_calibrate_all_experts is not None:
            return bool(self.moe_calibrate_all_experts)
        return bool(self.algorithms)

    @field_validator("algorithms", mode="before")
    @classmethod
    def _algos(cls, v):
        return [{"name": a} if isinstance(a, str) else a for a in (v or [])]

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def parse(cls, data: dict, source: str = "recipe") -> "Recipe":
        """Validate a dict (from YAML); every error is one ConfigError line naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got "
                              f"{type(data).__name__}")
        data = dict(data)
        targets = []
        for i, t in enumerate(data.pop("targets", []) or []):
            if not isinstance(t, dict):
                raise ConfigError(f"{source}: targets[{i}] must be a mapping")
            t = dict(t)
            unknown = set(t) - {"pattern", *ROLES}
            if unknown:
                raise ConfigError(f"{source}: targets[{i}]: unknown key {sorted(unknown)[0]!r}; "
                                  f"expected pattern, weight, input, output")
            if "pattern" not in t:
                raise ConfigError(f"{source}: targets[{i}] needs a 'pattern'")
            for r in ROLES:
                if r in t:
                    t[r] = _spec(t[r], f"{source}: targets[{i}].{r}")
            targets.append(Target(**t))
        if "kv_cache" in data:
            kv = data["kv_cache"]
            kv = dict(KV_SHORTHANDS[kv]) if isinstance(kv, str) and kv in KV_SHORTHANDS else kv
            data["kv_cache"] = _spec(kv, f"{source}: kv_cache")
        try:
            return cls(targets=targets, **data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                fields = GgufMix.model_fields if err["loc"][0] == "gguf_mix" else \
                    cls.model_fields
                raise ConfigError(f"{source}: unknown key {loc!r}; expected one of: "
                                  f"{', '.join(fields)}") from None
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{source}: {loc}: {msg}") from None

    def to_dict(self) -> dict:
        """Plain dict (YAML-ready) that :meth:`parse` turns back into an equal recipe."""
        def spec(s: QuantSpec | None):
            return None if s is None else s.model_dump(exclude_defaults=True)

        targets = []
        for t in self.targets:
            d: dict[str, Any] = {"pattern": t.pattern}
            for r in t.roles_set():
                d[r] = spec(getattr(t, r))
            targets.append(d)
        return {
            "name": self.name, "description": self.description, "targets": targets,
            "exclude": list(self.exclude), "kv_cache": spec(self.kv_cache),
            "algorithms": [a.model_dump(exclude_defaults=True) for a in self.algorithms],
            "group_policy": self.group_policy, "strict": self.strict,
            **{k: getattr(self, k) for k in ("moe_calibrate_all_experts", "moe_min_tokens",
                                             "feed")
               if getattr(self, k) is not None},
            **({"gguf_mix": self.gguf_mix.model_dump(exclude_defaults=True)}
               if self.gguf_mix is not None else {}),
        }

    # --- matching -------------------------------------------------------------------------
    def is_excluded(self, name: str) -> bool:
        """Whether the module called ``name`` is excluded."""
        return any(match(p, name) for p in self.exclude)

    def specs_for(self, name: str) -> tuple[dict[str, QuantSpec | None], list[int]]:
        """Resolved ``{role: spec}`` for module ``name`` and the indices of matching entries."""
        out: dict[str, QuantSpec | None] = {r: None for r in ROLES}
        hits = []
        for i, t in enumerate(self.targets):
            if any(match(p, name) for p in t.patterns):
                hits.append(i)
                for r in t.roles_set():
                    out[r] = getattr(t, r)
        return out, hits

    def names_module(self, name: str) -> bool:
        """Whether a target *names* module ``name``: one of its patterns matches ``name`` and
        contains the module's own name (the last dotted part, e.g. ``gate``) literally.

        ``"*shared_expert_gate"`` and ``"*.mlp.gate"`` name ``model.layers.0.mlp.gate`` /
        ``...shared_expert_gate``; ``"*"`` and ``"*.mlp.*"`` do not. Modules excluded by
        default (MoE routers, see :mod:`lowbit.nn.routers`) are quantized only when named.
        """
        own = name.rsplit(".", 1)[-1]
        return any(own in p and match(p, name) for t in self.targets for p in t.patterns)

    def has_static_activations(self) -> bool:
        """Whether calibration data is needed (a static input/output or KV-cache spec)."""
        specs = [getattr(t, r) for t in self.targets for r in ("input", "output")]
        specs.append(self.kv_cache)
        return any(s is not None and not s.dynamic and
                   not (s.block_format is not None and not s.block_format.global_scale)
                   for s in specs)


def match(pattern: str, name: str) -> bool:
    """fnmatch on the full name or on any dotted tail; ``re:`` patterns are searched."""
    if pattern.startswith("re:"):
        try:
            return re.search(pattern[3:], name) is not None
        except re.error as e:
            raise ConfigError(f"pattern {pattern!r} is not a valid regular expression: {e}") \
                from None
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(1, len(parts)))
