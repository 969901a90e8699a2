"""Percentile of |x| (default 99.99 %), read from the one-pass histogram (linear within a bin).

The histogram has ``num_bins`` (4096) bins over [0, R), R the power of two above the max |x| of the set, so at
least num_bins / 2 bins lie below the max; it is built in the same single pass as the range."""

from __future__ import annotations

import numpy as np

from ..profiles import TensorGrid
from .base import Calibrator, check_pow2_bins, register


def percentile_from_histogram(hist: np.ndarray, zeros: int, absmax: float, percentile: float,
                              cap: float | None = None) -> float:
    """The value below which ``percentile`` % of all |x| (zeros included) lie, interpolated within its bin;
    ``hist`` spans [0, absmax]; the result is at most ``cap`` (default absmax)."""
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
    return float(min(absmax if cap is None else cap, (b + frac) * width))


@register
class PercentileCalibrator(Calibrator):
    name = "percentile"
    uses_histogram = True
    one_pass_histogram = True

    def __init__(self, grid: TensorGrid | None = None, percentile: float = 99.99, num_bins: int = 4096):
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.num_bins = check_pow2_bins(num_bins)
        super().__init__(grid)

    def threshold(self) -> float:
        return percentile_from_histogram(self.hist, self.zeros, self.hist_range, self.percentile, cap=self.absmax)
