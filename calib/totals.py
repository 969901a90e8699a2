"""Totals of one calibration pass over every tapped tensor at once.

The native readers give one ``dq_calib_stats`` vector per batch: ``width`` values per tensor, in the tap's
order. Methods that need only what a pass adds up to (min, max, element count, histogram counts: minmax,
percentile, mse, kl) keep those totals here as arrays over all tensors, a few NumPy calls per batch instead of
Python per tensor, and hand them to their calibrators once, at the end of the pass (:meth:`PassTotals.flush`).
The result is the calibrators' state after the same batches fed one by one (EMA, whose state depends on the
batch order, is fed per batch instead).
"""

from __future__ import annotations

import numpy as np

from .base import Calibrator, merge_pow2


class PassTotals:
    """Per-tensor totals of one pass in ``mode``, in ``dq_calib_stats``'s layout per tensor (``buffer``, float64,
    which the in-place reader adds to directly): "range": [lo, hi]; "hist": [counts, zeros] over the tensor's
    [0, absmax] (``absmax`` given); "pow2": [lo, hi, R, counts, zeros] over [0, R), R the power of two above the
    running max. ``count``: values per tensor."""

    WIDTH = {"range": lambda b: 2, "hist": lambda b: b + 1, "pow2": lambda b: b + 4}

    def __init__(self, k: int, mode: str, num_bins: int, absmax: np.ndarray | None = None):
        if mode not in self.WIDTH:
            raise ValueError(f"no pass totals for mode {mode!r}")
        if (mode == "hist") != (absmax is not None):
            raise ValueError("the hist mode needs the absmax of every tensor (and only it)")
        self.mode, self.num_bins = mode, int(num_bins)
        b = self.num_bins
        self.buffer = np.zeros(k * self.WIDTH[mode](b))
        rows = self.buffer.reshape(k, -1)  # views into the buffer
        self.count = np.zeros(k, dtype=np.int64)
        self._absmax = None if absmax is None else np.ascontiguousarray(absmax, dtype=np.float64)
        if mode == "hist":
            self.hist, self.zeros = rows[:, :b], rows[:, b]
            return
        self.lo, self.hi = rows[:, 0], rows[:, 1]
        self.lo[:], self.hi[:] = np.inf, -np.inf
        if mode == "pow2":
            #: the one-pass histogram's R per tensor (0: none yet)
            self.hist_range, self.hist, self.zeros = rows[:, 2], rows[:, 3:3 + b], rows[:, 3 + b]

    def aux(self) -> np.ndarray | None:
        """The ``aux`` input of the next batch's statistics: absmax (hist), the current R (pow2), or None."""
        if self.mode == "hist":
            return self._absmax
        return np.ascontiguousarray(self.hist_range) if self.mode == "pow2" else None

    def bad_tensor(self) -> int | None:
        """Index of the first tensor whose range so far is NaN/Inf (a NaN stays), or None."""
        if self.mode == "hist":
            return None
        bad = ~(np.isfinite(self.lo) & np.isfinite(self.hi))
        return int(np.flatnonzero(bad)[0]) if bad.any() else None

    def add(self, stats: np.ndarray, sizes: np.ndarray) -> None:
        """Add one batch's statistics vector (``sizes``: values per tensor), as ``dq_raw_totals`` does."""
        m = stats.reshape(len(self.count), -1)
        b = self.num_bins
        self.count += sizes
        if self.mode == "hist":
            self.hist += m[:, :b]
            self.zeros += m[:, b]
            return
        lo, hi = m[:, 0], m[:, 1]
        self.lo[:] = np.where(np.isnan(lo) | (lo < self.lo), lo, self.lo)
        self.hi[:] = np.where(np.isnan(hi) | (hi > self.hi), hi, self.hi)
        if self.mode == "pow2":
            r = m[:, 2]  # >= the R given as aux (the kernel only grows it)
            for i in np.flatnonzero((r > self.hist_range) & (self.hist_range > 0)):
                self.hist[i] = merge_pow2(self.hist[i].copy(), int(round(r[i] / self.hist_range[i])))
            np.maximum(self.hist_range, r, out=self.hist_range)
            self.hist += m[:, 3:3 + b]
            self.zeros += m[:, 3 + b]

    def flush(self, calibrators: list[list[Calibrator]], pass_index: int) -> None:
        """Feed the totals to the calibrators (``calibrators[i]``: those of tensor i) as one batch."""
        for i, cals in enumerate(calibrators):
            for cal in cals:
                if self.mode != "hist" and self.count[i] > 0:
                    cal.update_range(float(self.lo[i]), float(self.hi[i]), int(self.count[i]), pass_index)
                if self.mode == "hist":
                    cal.update_histogram(self.hist[i], int(self.zeros[i]))
                elif self.mode == "pow2":
                    cal.update_pow2_histogram(self.hist[i], int(self.zeros[i]), float(self.hist_range[i]))
