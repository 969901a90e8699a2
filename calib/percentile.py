"""Percentile of |x| (default 99.99 %), read from the streamed histogram (linear within a bin)."""

from __future__ import annotations

import numpy as np

from ..profiles import TensorGrid
from .base import Calibrator, register


def percentile_from_histogram(hist: np.ndarray, zeros: int, absmax: float, percentile: float) -> float:
    """The value below which ``percentile`` % of all |x| (zeros included) lie, interpolated within its bin."""
    counts = hist.astype(np.float64).copy()
    counts[0] += zeros
    total = counts.sum()
    if total == 0 or absmax <= 0:
        return 0.0
    width = absmax / len(counts)
    target = total * percentile / 100.0
    cdf = np.cumsum(counts)
    b = int(np.searchsorted(cdf, target, side="left"))
    b = min(b, len(counts) - 1)
    below = cdf[b] - counts[b]
    frac = 0.0 if counts[b] == 0 else (target - below) / counts[b]
    return float(min(absmax, (b + frac) * width))


@register
class PercentileCalibrator(Calibrator):
    name = "percentile"
    uses_histogram = True

    def __init__(self, grid: TensorGrid | None = None, percentile: float = 99.99, num_bins: int = 2048):
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.num_bins = int(num_bins)
        super().__init__(grid)

    def threshold(self) -> float:
        return percentile_from_histogram(self.hist, self.zeros, self.absmax, self.percentile)
