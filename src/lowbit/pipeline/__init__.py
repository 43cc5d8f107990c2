"""The PTQ pipeline: apply a recipe, run algorithm steps, calibrate."""

from lowbit.pipeline.quantize import calibrate, quantize

__all__ = ["calibrate", "quantize"]
