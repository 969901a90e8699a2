"""Post-training calibration of activation ranges (minmax, ema, kl, percentile, mse, aciq, eq) and the JSON scale file.

>>> sf = calibrate(net, x_calib, profile="ncnn")  # method DEFAULT_METHOD ("mse"); or "kl", "aciq", ...
>>> sf.save("scales.json"); print(report(sf))
"""

from . import aciq, ema, eq, kl, minmax, mse, percentile  # noqa: F401  (register the methods)
from .api import CalibrationWarning, apply, calibrate, check, class_balanced_sampler, iter_batches, report
from .base import CALIBRATORS, DEFAULT_METHOD, CalibrationError, Calibrator, RangeResult, get_calibrator, register
from .scalefile import ScaleFile, ScaleFileError, TensorRange, load

__all__ = ["CALIBRATORS", "DEFAULT_METHOD", "CalibrationError", "CalibrationWarning", "Calibrator", "RangeResult",
           "ScaleFile", "ScaleFileError", "TensorRange", "apply", "calibrate", "check", "class_balanced_sampler",
           "get_calibrator", "iter_batches", "load", "register", "report"]
