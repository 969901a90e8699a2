"""Streaming histograms of |x| with ncnn2table's binning: ``index = min(int(|x| / absmax * bins), bins - 1)``,
exact zeros counted apart (KL skips them as ncnn does; percentile and MSE add them back)."""

from __future__ import annotations

import numpy as np


def abs_histogram(x: np.ndarray, absmax: float, num_bins: int = 2048) -> tuple[np.ndarray, int]:
    """Counts of the non-zero ``|x|`` in ``num_bins`` equal bins over ``[0, absmax]`` and the number of zeros."""
    a = np.abs(np.asarray(x, dtype=np.float32).ravel())
    zeros = a.size - int(np.count_nonzero(a))
    if absmax <= 0 or zeros == a.size:
        return np.zeros(num_bins, dtype=np.int64), zeros
    a *= np.float32(num_bins / absmax)
    idx = a.astype(np.int32)
    np.minimum(idx, num_bins - 1, out=idx)
    counts = np.bincount(idx, minlength=num_bins).astype(np.int64)
    counts[0] -= zeros  # zeros land in bin 0; ncnn skips them
    return counts, zeros
