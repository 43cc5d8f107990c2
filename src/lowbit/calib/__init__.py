"""Calibrators: how a static quantizer's ``amax`` (and ``amin``) is chosen from data.

>>> import torch
>>> from lowbit.core import QuantSpec
>>> from lowbit.calib import get_calibrator
>>> cal = get_calibrator("percentile", QuantSpec(format="int8"), percentile=99.9)
>>> for _ in range(4):
...     cal.observe(torch.randn(8, 16, 64))          # e.g. activations [batch, seq, hidden]
>>> cal.compute()["amax"].shape                       # per tensor: []
torch.Size([])

Calibrators (``calibrator_names()``): ``max`` (running max |x|), ``percentile`` (default
99.99), ``mse`` (clipping ratio with the least quantization error) and ``entropy``
(TensorRT's KL threshold). Each works per tensor or per channel (``spec.axis``); statistics
come back in the stored scale layout of :mod:`lowbit.core.layout`. States merge exactly
across processes: :meth:`Calibrator.merge_states`, :meth:`Calibrator.all_reduce`.
See :mod:`lowbit.calib.base` for the contract and :mod:`lowbit.calib.histogram` for the
histogram calibrators.
"""

from lowbit.calib.base import Calibrator, calibrator_names, get_calibrator, register_calibrator
from lowbit.calib import max, histogram  # noqa: E402,F401  (registers the calibrators)
from lowbit.calib.max import MaxCalibrator  # noqa: E402
from lowbit.calib.histogram import (  # noqa: E402
    EntropyCalibrator, HistogramCalibrator, MSECalibrator, PercentileCalibrator,
)

__all__ = [
    "Calibrator", "EntropyCalibrator", "HistogramCalibrator", "MSECalibrator",
    "MaxCalibrator", "PercentileCalibrator", "calibrator_names", "get_calibrator",
    "register_calibrator",
]
