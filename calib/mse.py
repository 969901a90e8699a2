"""MSE: the threshold minimising the expected quantization error (clipping + rounding) on the |x| histogram.

Candidates are the bin edges T = (i + 1) * w. With bin centres c_k and counts n_k (zeros exact, no error):
``E(T) = sum_{c_k > T} n_k (c_k - T)^2 + (T / qmax)^2 / 12 * #{non-zero values with c_k <= T}``
(uniform rounding noise of a step T/qmax inside the range). First minimum wins. The histogram is the one-pass
histogram of percentile.py (``num_bins`` = 4096 over [0, R), R the power of two above max |x|); T <= max |x|.
"""

from __future__ import annotations

import numpy as np

from ..profiles import TensorGrid
from .base import Calibrator, check_pow2_bins, register


def mse_errors(hist: np.ndarray, absmax: float, qmax: int) -> np.ndarray:
    """E(T) for T = (i + 1) * absmax / len(hist), i = 0 .. len(hist) - 1 (zeros excluded from ``hist``)."""
    n = np.asarray(hist, dtype=np.float64)
    nb = len(n)
    w = absmax / nb
    c = (np.arange(nb) + 0.5) * w
    T = (np.arange(nb) + 1) * w
    # suffix sums over bins k > i (bins strictly above the edge T_i are clipped)
    def suffix(v):
        s = np.cumsum(v[::-1])[::-1]
        return np.concatenate([s[1:], [0.0]])
    s0, s1, s2 = suffix(n), suffix(n * c), suffix(n * c * c)
    clip = s2 - 2 * T * s1 + T * T * s0
    inside = np.cumsum(n)
    return clip + (T / qmax) ** 2 / 12.0 * inside


@register
class MSECalibrator(Calibrator):
    name = "mse"
    uses_histogram = True
    one_pass_histogram = True

    def __init__(self, grid: TensorGrid | None = None, num_bins: int = 4096):
        self.num_bins = check_pow2_bins(num_bins)
        super().__init__(grid)

    def threshold(self) -> float:
        if self.hist is None or self.hist.sum() == 0:
            return 0.0
        err = mse_errors(self.hist, self.hist_range, self.qmax_abs)
        return min(self.absmax, (int(np.argmin(err)) + 1) * self.hist_range / self.num_bins)
