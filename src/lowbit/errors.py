"""The small error hierarchy of lowbit.

Every message names what was wrong (the field, layer, tensor or file) and what was
expected, in one line. Catch :class:`LowbitError` to catch them all.
"""

from __future__ import annotations


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose."""


class ConfigError(LowbitError, ValueError):
    """A spec, recipe or option is invalid (unknown key, unknown format, bad group size...)."""


class FormatError(LowbitError, ValueError):
    """A value cannot be represented or a code is invalid for a number format."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint on disk is missing, truncated, or does not match what was expected."""


class CalibrationError(LowbitError, RuntimeError):
    """Calibration did not see the data it needs (no batches, no statistics...)."""
