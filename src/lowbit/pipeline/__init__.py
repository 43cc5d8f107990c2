"""The PTQ pipeline: apply a recipe, run algorithm steps, calibrate; stream checkpoints
larger than memory block by block (resumable), data-parallel calibration."""

from lowbit.pipeline.quantize import calibrate, quantize


def __getattr__(name):  # lazy: streaming pulls in transformers and the exporters
    if name in ("quantize_checkpoint", "StreamResult"):
        from lowbit.pipeline import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'lowbit.pipeline' has no attribute {name!r}")


__all__ = ["StreamResult", "calibrate", "quantize", "quantize_checkpoint"]
