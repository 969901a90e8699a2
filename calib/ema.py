"""Moving average of the per-batch range (the seed's "naive" calibration, fixed).

Per batch b with range (lo_b, hi_b): ``ema = momentum * ema + (1 - momentum) * range_b``; unlike the seed, the
first batch initialises the average (no bias towards 0). ``passes`` repeats the data (the seed used 3 epochs);
threshold = max(|ema_lo|, |ema_hi|). Values beyond it are clipped, but how many is not measured (None).
"""

from __future__ import annotations

from ..profiles import TensorGrid
from .base import Calibrator, register


@register
class EMACalibrator(Calibrator):
    name = "ema"

    def __init__(self, grid: TensorGrid | None = None, momentum: float = 0.9, passes: int = 1):
        super().__init__(grid)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        self.momentum = float(momentum)
        self.range_passes = int(passes)
        self.ema_lo: float | None = None
        self.ema_hi: float | None = None

    def update_range(self, lo: float, hi: float, n: int, pass_index: int = 0) -> None:
        super().update_range(lo, hi, n, pass_index)
        if self.ema_lo is None:
            self.ema_lo, self.ema_hi = float(lo), float(hi)
        else:
            m = self.momentum
            self.ema_lo = m * self.ema_lo + (1 - m) * float(lo)
            self.ema_hi = m * self.ema_hi + (1 - m) * float(hi)

    def threshold(self) -> float:
        if self.ema_lo is None:
            return 0.0
        return float(max(abs(self.ema_lo), abs(self.ema_hi)))
