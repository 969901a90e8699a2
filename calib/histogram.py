"""Streaming histograms of |x| with ncnn2table's binning: ``index = min(int(|x| / absmax * bins), bins - 1)``,
exact zeros counted apart (KL skips them as ncnn does; percentile and MSE add them back)."""

from __future__ import annotations

import numpy as np


def _scratch(work: dict | None, key: str, n: int, dtype) -> np.ndarray:
    if work is None:
        return np.empty(n, dtype=dtype)
    buf = work.get(key)
    if buf is None or buf.size < n:
        buf = work[key] = np.empty(n, dtype=dtype)
    return buf[:n]


def abs_histogram(x: np.ndarray, absmax: float, num_bins: int = 2048, work: dict | None = None
                  ) -> tuple[np.ndarray, int]:
    """Counts of the non-zero ``|x|`` in ``num_bins`` equal bins over ``[0, absmax]`` and the number of zeros.

    ``work``: a dict the caller keeps between calls, for scratch buffers (no allocation per batch); ``x`` is
    never written."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    a = _scratch(work, "abs", x.size, np.float32)
    np.abs(x, out=a)
    zeros = a.size - int(np.count_nonzero(a.view(np.int32)))  # |x| is +0.0 (bits 0) exactly for zeros
    if absmax <= 0 or zeros == a.size:
        return np.zeros(num_bins, dtype=np.int64), zeros
    a *= np.float32(num_bins / absmax)
    idx = _scratch(work, "idx", x.size, np.int32)
    np.copyto(idx, a, casting="unsafe")  # truncation, as astype(int32); |x| = absmax gives num_bins
    full = np.bincount(idx, minlength=num_bins + 1).astype(np.int64, copy=False)
    counts = full[:num_bins].copy()
    counts[-1] += full[num_bins:].sum()  # min(index, bins - 1)
    counts[0] -= zeros  # zeros land in bin 0; ncnn skips them
    return counts, zeros
