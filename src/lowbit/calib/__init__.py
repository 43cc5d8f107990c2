"""Calibrators: how a static quantizer's amax is chosen from observed data.

>>> from lowbit.calib import get_calibrator
>>> cal = get_calibrator("percentile", spec, percentile=99.9)   # doctest: +SKIP
>>> cal.observe(x); cal.compute()["amax"]                        # doctest: +SKIP
"""

from lowbit.calib.base import Calibrator, calibrator_names, get_calibrator, register_calibrator
from lowbit.calib import histogram, max  # noqa: F401,E402  (register)

__all__ = ["Calibrator", "calibrator_names", "get_calibrator", "register_calibrator"]
