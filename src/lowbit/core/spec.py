"""``QuantSpec``: how one tensor is quantized (format, granularity, symmetry, dynamics).

Granularities (``axis`` counts from 0; negative values count from the end):

* ``tensor``: one scale for the whole tensor;
* ``channel``: one scale per index of ``axis`` (default 0: output channels of a weight);
* ``group``: groups of ``group_size`` consecutive values along ``axis`` (default -1: the
  input dimension of a weight), one scale per group; the size must divide the axis;
* ``block``: 2-D tiles ``block = (rows, cols)`` over the last two dimensions (e.g. 128x128
  FP8 blocks); edge tiles may be partial;
* ``token``: one scale per vector along the last axis (per token of an activation),
  computed at run time, so it requires ``dynamic=True``.

Block-scaled formats (``nvfp4``, ``mxfp4``, ...) fix their own granularity: groups of
16 or 32 along the last axis with e4m3 or e8m0 scales.

ggml block types (``gguf_q8_0``, ``gguf_q4_0``, ``gguf_q4_1``, ``gguf_q5_0``, ``gguf_q5_1``,
``gguf_q2_k``, ``gguf_q3_k``, ``gguf_q4_k``, ``gguf_q5_k``, ``gguf_q6_k``, ``gguf_iq4_nl``,
``gguf_iq4_xs``, ``gguf_nvfp4``; see :mod:`lowbit.core.ggml`) are weight formats that fix
their granularity too: groups of the type's sub-block (16 or 32) along the last axis, whose
length must be a multiple of ggml's block (256, 64 or 32: checked when quantizing).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from lowbit import formats
from lowbit.core.blocks import block_format_names, get_block_format
from lowbit.core.ggml_types import GGML_TYPES
from lowbit.errors import ConfigError, FormatError

_GGML_FORMATS = {"gguf_" + n.lower(): n for n in GGML_TYPES}

Granularity = Literal["tensor", "channel", "group", "block", "token"]
ScaleFormat = Literal["fp32", "fp16", "bf16", "e8m0", "e4m3"]


class QuantSpec(BaseModel):
    """How to quantize one tensor. Immutable; build with keywords or :meth:`parse`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    granularity: Granularity | None = None
    axis: int | None = None
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    narrow_range: bool = False
    # symmetric integers only (ignored otherwise): "half_range" (default) -> scale =
    # amax / ((qmax - qmin) / 2), e.g. amax / 7.5 for int4 with codes -8..7 (the positive
    # extreme clips by half a step), the convention of GPTQ, compressed-tensors and torchao,
    # and measurably better at 4 bits; "qmax" -> scale = amax / qmax (int4: codes -7..7)
    sym_scale: Literal["qmax", "half_range"] = "half_range"
    dynamic: bool = False
    scale_format: ScaleFormat = "fp32"
    calibrator: str = "max"
    calibrator_args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.format in _GGML_FORMATS:
            return self._check_ggml()
        bf = get_block_format(self.format)
        if bf is not None:
            if self.granularity not in (None, "group"):
                raise ConfigError(f"format {self.format} has its own granularity (groups of "
                                  f"{bf.block_size}); got granularity {self.granularity!r}")
            if self.group_size not in (None, bf.block_size):
                raise ConfigError(f"format {self.format} uses groups of {bf.block_size}; got "
                                  f"group_size {self.group_size}")
            if self.axis not in (None, -1):
                raise ConfigError(f"format {self.format} groups along the last axis; got axis "
                                  f"{self.axis}")
            if not self.symmetric:
                raise ConfigError(f"format {self.format} is symmetric; got symmetric: false")
            if self.narrow_range:
                raise ConfigError(f"narrow_range is for integer formats, not {self.format}")
            if self.block is not None:
                raise ConfigError(f"block is only for granularity 'block', not format "
                                  f"{self.format} (groups of {bf.block_size})")
            object.__setattr__(self, "granularity", "group")
            object.__setattr__(self, "group_size", bf.block_size)
            object.__setattr__(self, "axis", -1)
            object.__setattr__(self, "scale_format", bf.scale_format)
            return self
        try:
            fmt = formats.get(self.format)
        except FormatError:
            raise ConfigError(
                f"unknown format {self.format!r}; expected one of: "
                f"{', '.join(formats.names() + block_format_names() + list(_GGML_FORMATS))}"
            ) from None
        if fmt.kind == "float" and not fmt.signed:
            raise ConfigError(f"format {self.format} is a scale format, not an element format")
        g = self.granularity or "tensor"
        object.__setattr__(self, "granularity", g)
        if g == "group":
            if self.group_size is None or self.group_size < 1:
                raise ConfigError("granularity 'group' needs a positive group_size")
            if self.axis is None:
                object.__setattr__(self, "axis", -1)
        elif self.group_size is not None:
            raise ConfigError(f"group_size is only for granularity 'group', not {g!r}")
        if g == "channel" and self.axis is None:
            object.__setattr__(self, "axis", 0)
        if g == "block":
            if self.block is None or min(self.block) < 1:
                raise ConfigError("granularity 'block' needs block: [rows, cols] (positive)")
        elif self.block is not None:
            raise ConfigError(f"block is only for granularity 'block', not {g!r}")
        if g == "token" and not self.dynamic:
            raise ConfigError("granularity 'token' is computed per input: set dynamic: true")
        if not self.symmetric and fmt.kind != "int":
            raise ConfigError(f"asymmetric quantization needs an integer format, not {self.format}")
        if self.narrow_range and fmt.kind != "int":
            raise ConfigError(f"narrow_range is for integer formats, not {self.format}")
        return self

    def _check_ggml(self) -> "QuantSpec":
        t = GGML_TYPES[_GGML_FORMATS[self.format]]
        sub, sup = t.block.sub, t.block.super
        if self.granularity not in (None, "group"):
            raise ConfigError(f"format {self.format} has its own granularity (sub-blocks of "
                              f"{sub} in blocks of {sup}); got granularity {self.granularity!r}")
        if self.group_size not in (None, sub):
            raise ConfigError(f"format {self.format} uses sub-blocks of {sub}; got group_size "
                              f"{self.group_size}")
        if self.axis not in (None, -1):
            raise ConfigError(f"format {self.format} blocks along the last axis; got axis "
                              f"{self.axis}")
        if "symmetric" in self.model_fields_set and self.symmetric == t.affine:
            raise ConfigError(f"format {self.format} is {'affine' if t.affine else 'symmetric'}; "
                              f"got symmetric: {str(self.symmetric).lower()}")
        for key in ("narrow_range", "dynamic", "block"):
            if getattr(self, key):
                raise ConfigError(f"{key} is not an option of ggml format {self.format}")
        if "scale_format" in self.model_fields_set and self.scale_format != "fp16":
            raise ConfigError(f"format {self.format} stores float16 scales; got scale_format "
                              f"{self.scale_format!r}")
        if self.calibrator != "max" or self.calibrator_args:
            raise ConfigError(f"format {self.format} is a weight format that searches its own "
                              "scales; calibrator options do not apply")
        object.__setattr__(self, "granularity", "group")
        object.__setattr__(self, "group_size", sub)
        object.__setattr__(self, "axis", -1)
        object.__setattr__(self, "symmetric", not t.affine)
        object.__setattr__(self, "scale_format", "fp16")
        return self

    # --- helpers -------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: "QuantSpec | dict | str", where: str = "spec") -> "QuantSpec":
        """Build a spec from a dict (or a bare format name); errors become one-line ConfigError.

        ``where`` names the place of the spec in its recipe, for the message.
        """
        if isinstance(data, QuantSpec):
            return data
        if isinstance(data, str):
            data = {"format": data}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc!r}; expected one of: {', '.join(cls.model_fields)}"
            elif loc:
                msg = f"{loc}: {msg}"
            raise ConfigError(f"{where}: {msg}") from None

    @property
    def block_format(self):
        """The :class:`BlockFormat` when the format is block-scaled, else None."""
        return get_block_format(self.format)

    @property
    def ggml_type(self) -> str | None:
        """The ggml type (``"Q4_K"``) of a ``gguf_*`` format, else None."""
        return _GGML_FORMATS.get(self.format)

    @property
    def element_format(self) -> formats.Format:
        """The element (code) format: e2m1 for nvfp4, int4 for int4 ...

        ConfigError for ``gguf_*`` formats: their codes are ggml's (see lowbit.core.ggml).
        """
        if self.format in _GGML_FORMATS:
            raise ConfigError(f"format {self.format} is a ggml block type: its codes have no "
                              "lowbit element format (write it with the gguf exporter)")
        bf = self.block_format
        fmt = formats.get(bf.element if bf else self.format)
        if self.narrow_range:
            fmt = fmt.narrowed()
        return fmt

    @property
    def bits(self) -> int:
        """Bits of one code."""
        if self.format in _GGML_FORMATS:
            return GGML_TYPES[_GGML_FORMATS[self.format]].code_bits
        return self.element_format.bits

    def scale_bits(self) -> int:
        """Bits of one stored scale (zero-points of asymmetric specs add ``bits`` more)."""
        return {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "e4m3": 8}[self.scale_format]

    def short(self) -> str:
        """Compact description, e.g. ``int4 g64 asym`` or ``fp8_e4m3 token dyn``."""
        g = {"tensor": "tensor", "channel": f"ch{self.axis}", "token": "token",
             "group": f"g{self.group_size}", "block": f"b{self.block}"}[self.granularity]
        parts = [self.format, g]
        if not self.symmetric:
            parts.append("asym")
        if self.dynamic:
            parts.append("dyn")
        return " ".join(parts)
