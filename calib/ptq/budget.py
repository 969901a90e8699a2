"""A time budget for a reconstruction pass (AdaRound, BRECQ): the iterations per unit that fit.

Before the pass, every unit runs two training iterations on zero inputs of its shapes (the first untimed:
kernel set-up); the second gives its seconds per iteration. Before each unit is trained, the time left (the
budget minus the time spent, minus the estimated cost of advancing the caches over the units still to come,
scaled from what advancing has cost per second of iteration so far) divided by the seconds per iteration of
that unit and all later ones gives the iterations of each: between ``min_iters`` and the configured ``iters``,
the same for every unit where the estimate holds (AdaRound's schedule), re-planned unit by unit.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class Budget:
    """Iterations per unit for ``seconds`` of wall time (from construction on) over units whose training
    iterations take ``per_iter`` seconds each."""

    def __init__(self, seconds: float, max_iters: int, min_iters: int = 10) -> None:
        if seconds <= 0:
            raise ValueError(f"time budget must be positive, got {seconds:g} s")
        self.seconds, self.max_iters = float(seconds), int(max_iters)
        self.min_iters = max(1, min(int(min_iters), self.max_iters))
        self.t0 = time.perf_counter()
        self.per_iter: list[float] = []
        self.advance_s, self.advance_per_iter = 0.0, 0.0  # seconds advanced, and the per_iter of those units
        self.iters: list[int] = []

    def probed(self, per_iter: list[float]) -> None:
        """Set the probed seconds per iteration of every unit."""
        self.per_iter = [max(float(s), 1e-9) for s in per_iter]

    def advanced(self, k: int, seconds: float, first: bool) -> None:
        """Record ``seconds`` spent advancing the caches over unit ``k`` (``first``: its first advance)."""
        self.advance_s += seconds
        if first:
            self.advance_per_iter += self.per_iter[k]

    def iters_for(self, k: int) -> int:
        """Iterations of unit ``k`` (and, where the estimate holds, of every later unit)."""
        rest = float(sum(self.per_iter[k:]))
        rate = self.advance_s / self.advance_per_iter if self.advance_per_iter > 0 else 0.0
        adv = rate * (rest - 0.5 * self.per_iter[k])  # the rest of this unit's advance, then the later units'
        left = self.seconds - (time.perf_counter() - self.t0) - adv
        n = int(np.clip(np.floor(left / rest), self.min_iters, self.max_iters))
        self.iters.append(n)
        return n

    def report(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "iters": list(self.iters), "elapsed": time.perf_counter() - self.t0,
                "min_iters": self.min_iters, "probe_seconds_per_iter": list(self.per_iter)}
