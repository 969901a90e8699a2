"""ACIQ: the Gaussian analytical clip of ncnn2table (``compute_aciq_gaussian_clip``, ``QuantNet::quantize_ACIQ``).

One range pass: absmax of x over the calibration set and N = the tensor's element count per image (ncnn's
``stat.total = c * h * w``). With ``c = 0.5 * 0.35 * (1 + sqrt(pi * ln 4))`` ncnn estimates the standard
deviation of a Gaussian whose expected maximum over N samples is absmax, ``std = 2 c absmax / sqrt(2 ln N)``,
and clips at ``T = alpha[bits] * std`` (alpha: the Gaussian-optimal clip of Banner et al. per bit width;
``alpha[8] = 3.92403714``). T may exceed absmax (small N): the grid then spans [-T, T] as ncnn's does.

ncnn2table also clips the *weights* with this formula; deployq's weight grids stay max-abs (every exporter
recovers the step from max|W|), so only the activation thresholds are ACIQ's here.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Calibrator, RangeResult, register

#: ncnn2table's ``alpha_gaussian[num_bits - 1]`` (index 0 unused)
ALPHA_GAUSSIAN = (0.0, 1.71063519, 2.15159277, 2.55913646, 2.93620062, 3.28691474, 3.6151146, 3.92403714)
GAUSSIAN_CONST = (0.5 * 0.35) * (1 + math.sqrt(math.pi * math.log(4)))


def aciq_gaussian_clip(absmax: float, n: int, bits: int = 8) -> float:
    """ncnn2table's ``compute_aciq_gaussian_clip(absmax, N, num_bits)`` (double arithmetic, float result)."""
    if not 2 <= bits <= len(ALPHA_GAUSSIAN):
        raise ValueError(f"ACIQ has Gaussian clips for 2..{len(ALPHA_GAUSSIAN)} bits, got {bits}")
    if n < 2:
        raise ValueError(f"ACIQ needs at least 2 elements per image, got {n}")
    std = (float(np.float32(absmax)) * 2 * GAUSSIAN_CONST) / math.sqrt(2 * math.log(n))
    return float(np.float32(ALPHA_GAUSSIAN[bits - 1] * std))


@register
class ACIQCalibrator(Calibrator):
    """ACIQ threshold from absmax and the per-image element count (``images`` is set by ``calibrate``)."""

    name = "aciq"

    @property
    def per_image(self) -> int:
        """Elements of the tensor per image (ncnn's N)."""
        if self.images <= 0:
            raise ValueError("ACIQ needs the number of calibration images (set by calibrate())")
        return self.count // self.images

    def threshold(self) -> float:
        return aciq_gaussian_clip(self.absmax, self.per_image, self.grid.bits)

    def compute(self) -> RangeResult:
        t = float(self.threshold())
        if self.grid.symmetric and (self.grid.signed or self.signed_data):
            lo = -t  # the grid spans [-T, T] even where T > absmax (ncnn's scale 127 / T)
        else:
            lo = max(min(self.min, 0.0), -t)
        return RangeResult(threshold=t, lo=float(lo), hi=t, clipped_share=self.clipped_share(t))
