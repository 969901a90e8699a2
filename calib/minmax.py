"""Min-max: the threshold is the largest |x| seen over the whole calibration set (nothing clipped)."""

from __future__ import annotations

from .base import Calibrator, register


@register
class MinMaxCalibrator(Calibrator):
    name = "minmax"

    def threshold(self) -> float:
        return self.absmax
