"""Moving average of the per-batch range (the seed's "naive" calibration, fixed).

Per batch b with range (lo_b, hi_b): ``ema = momentum * ema + (1 - momentum) * range_b``; unlike the seed, the
first batch initialises the average (no bias towards 0). ``passes`` repeats the data (the seed used 3 epochs);
threshold = max(|ema_lo|, |ema_hi|).

Clipped share (a running count, no histogram and no extra pass): during the last pass, each batch's values
beyond the running threshold *after* that batch's update, ``|x| > max(|ema_lo|, |ema_hi|)``, are counted; the
share is that count over the values of the pass. The running threshold converges to the final one (exactly so
for a constant per-batch range), so this is an estimate of what the final threshold clips; the guard rails use it.
"""

from __future__ import annotations

import numpy as np

from ..profiles import TensorGrid
from .base import Calibrator, RangeResult, register


@register
class EMACalibrator(Calibrator):
    name = "ema"
    observe_mode = "clip"
    order_independent = False  # a moving average of the per-batch ranges

    def __init__(self, grid: TensorGrid | None = None, momentum: float = 0.9, passes: int = 1):
        super().__init__(grid)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if int(passes) != passes or passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {passes}")
        self.momentum = float(momentum)
        self.range_passes = int(passes)
        self.ema_lo: float | None = None
        self.ema_hi: float | None = None
        self.clip_count = 0
        self.clip_total = 0
        self._batch_absmax = 0.0

    def update_range(self, lo: float, hi: float, n: int, pass_index: int = 0) -> None:
        super().update_range(lo, hi, n, pass_index)
        self._batch_absmax = max(abs(float(lo)), abs(float(hi)))
        if self.ema_lo is None:
            self.ema_lo, self.ema_hi = float(lo), float(hi)
        else:
            m = self.momentum
            self.ema_lo = m * self.ema_lo + (1 - m) * float(lo)
            self.ema_hi = m * self.ema_hi + (1 - m) * float(hi)

    def observe(self, a: np.ndarray, pass_index: int = 0) -> None:
        if pass_index != self.range_passes - 1:
            return
        t = np.float32(self.threshold())
        if self._batch_absmax <= t:  # nothing beyond the threshold in this batch
            self.observe_clipped(0, a.size, pass_index)
            return
        self.observe_clipped(int(np.count_nonzero(a > t)) + int(np.count_nonzero(a < -t)), a.size, pass_index)

    def observe_clipped(self, clipped: int, n: int, pass_index: int = 0) -> None:
        if pass_index != self.range_passes - 1:
            return
        self.clip_total += int(n)
        self.clip_count += int(clipped)

    def state_row(self) -> tuple[float, float, float, float]:
        """``[ema_lo, ema_hi, initialised, momentum]``: what ``dq_calib_stats(mode="clip")`` reads to repeat
        ``update_range`` + ``observe`` in the graph."""
        if self.ema_lo is None:
            return (0.0, 0.0, 0.0, self.momentum)
        return (self.ema_lo, self.ema_hi, 1.0, self.momentum)

    def threshold(self) -> float:
        if self.ema_lo is None:
            return 0.0
        return float(max(abs(self.ema_lo), abs(self.ema_hi)))

    def running_clipped_share(self) -> float | None:
        """Share of the last pass's values beyond the running threshold (None before any batch)."""
        return None if self.clip_total == 0 else self.clip_count / self.clip_total

    def compute(self) -> RangeResult:
        r = super().compute()
        return RangeResult(r.threshold, r.lo, r.hi, self.running_clipped_share())
