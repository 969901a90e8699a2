"""The calibrator interface and the name -> class registry.

A calibrator sees one tensor. The collector (``deployq.calib.collect``) feeds it, per batch, the batch range
(``update_range``) during one or more *range passes* and, for histogram methods, either one streamed histogram of
``|x|`` over ``[0, absmax]`` (``update_histogram``) during a second pass (KL: ncnn's algorithm needs the range of
the whole set first), or, in the same single pass as the range, a histogram over ``[0, R)`` with R the power of
two above the running max |x| (``update_pow2_histogram``; percentile, MSE), merged exactly when R grows.
``compute()`` returns a :class:`RangeResult`. State never grows with the number of images: a few floats, or one
fixed-size histogram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import InputError
from ..profiles import TensorGrid


def pow2_range(absmax: float, current: float) -> float:
    """The one-pass histogram's range after a batch with max |x| = ``absmax``: ``current``, or the smallest power
    of two above ``absmax`` when that is not below ``current`` (calibstats.h's ``pow2_range``)."""
    if not absmax >= current or absmax == 0.0:
        return current
    return math.ldexp(1.0, math.frexp(absmax)[1])


def check_pow2_bins(num_bins: int) -> int:
    """``num_bins`` of a one-pass histogram: a power of two in [2, 2^24] (else the merges would not be exact)."""
    n = int(num_bins)
    if n != num_bins or n < 2 or n > 2 ** 24 or n & (n - 1):
        raise ValueError(f"num_bins must be a power of two in [2, 2^24] for the one-pass histogram, got {num_bins}")
    return n


def merge_pow2(hist: np.ndarray, factor: int) -> np.ndarray:
    """A histogram of ``len(hist)`` bins over [0, R) as the histogram over [0, factor * R) (``factor`` a power of
    two): bin i goes to bin i // factor. Exact when the bins were computed as trunc(|x| * bins / R) with a
    power-of-two bin count (the product is exact then)."""
    n = len(hist)
    if factor <= 1:
        return hist
    if factor >= n:
        out = np.zeros_like(hist)
        out[0] = hist.sum()
        return out
    out = np.zeros_like(hist)
    out[:n // factor] = hist.reshape(n // factor, factor).sum(axis=1)
    return out


class CalibrationError(InputError, ValueError):
    """Bad calibration input (empty data, NaN/Inf activations, a constant-zero tensor, wrong model ...)."""


@dataclass(frozen=True)
class RangeResult:
    """What a calibrator decides for one tensor.

    ``threshold`` is the clipping threshold T in float units (symmetric grids clip to [-T, T]); ``lo``/``hi``
    the float range actually represented; ``clipped_share`` the share of values beyond T (from the histogram;
    EMA: a running count, see ``deployq.calib.ema``), or None where the method cannot know it."""

    threshold: float
    lo: float
    hi: float
    clipped_share: float | None


class Calibrator:
    """Base class: tracks the observed range of one tensor; subclasses choose the threshold.

    :param grid: the activation grid of the profile (bits, signedness) the range is for.
    """

    name: ClassVar[str] = ""
    #: number of passes over the data that call ``update_range`` (EMA may use several)
    range_passes: ClassVar[int] = 1
    #: whether the method reads a histogram of |x|
    uses_histogram: ClassVar[bool] = False
    #: histogram in the range pass (over [0, R), R a power of two, ``update_pow2_histogram``) instead of a
    #: second pass over [0, absmax]; needs a power-of-two ``num_bins`` (a class default: KL sets it per instance)
    one_pass_histogram: bool = False
    #: what the last range pass needs beyond the batch range, computed in the graph by the fused calibration
    #: operator (``dq_calib_stats``): "range" (nothing) or "clip" (EMA's count of values beyond the running
    #: threshold, given to ``observe_clipped``)
    observe_mode: ClassVar[str] = "range"
    #: whether the state after a pass depends only on what the pass adds up to (min, max, count, histogram),
    #: not on the order of the batches: then the collector may feed one pass's totals as a single batch
    order_independent: ClassVar[bool] = True
    #: whether ``compute()`` is costly enough (and mostly outside the GIL) to run calibrators in threads
    parallel_compute: ClassVar[bool] = False

    def __init__(self, grid: TensorGrid | None = None):
        self.grid = grid or TensorGrid()
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.num_bins = getattr(self, "num_bins", 2048)
        self.hist: np.ndarray | None = None  # counts of |x| in num_bins bins over [0, hist_range], zeros excluded
        self.zeros = 0
        #: the one-pass histogram's current R (0: none yet)
        self.pow2_hist_range = 0.0
        #: calibration images seen, set by ``calibrate()`` before ``compute()`` (ACIQ's elements per image)
        self.images = 0

    # -- feeding -------------------------------------------------------------------------------------------
    def update_range(self, lo: float, hi: float, n: int, pass_index: int = 0) -> None:
        """One batch of the range pass(es): its min, max and element count."""
        if pass_index == 0:
            self.min = min(self.min, float(lo))
            self.max = max(self.max, float(hi))
            self.count += int(n)

    def observe(self, a: np.ndarray, pass_index: int = 0) -> None:
        """One batch of the range pass(es), the tensor itself (read-only, after ``update_range``); a method that
        needs more than the batch range (EMA's running clipped count) overrides this."""

    def observe_clipped(self, clipped: int, n: int, pass_index: int = 0) -> None:
        """``observe`` as computed in the graph (``observe_mode = "clip"``): the batch's ``n`` values, of which
        ``clipped`` lie beyond the running threshold after ``update_range``."""

    def update_histogram(self, counts: np.ndarray, zeros: int) -> None:
        """One batch of the histogram pass: counts of non-zero |x| per bin, and the number of exact zeros."""
        if self.hist is None:
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
        np.add(self.hist, counts, out=self.hist, casting="unsafe")  # counts: integers, also as float64
        self.zeros += int(zeros)

    def update_pow2_histogram(self, counts: np.ndarray, zeros: int, hist_range: float) -> None:
        """One batch of the one-pass histogram (after its ``update_range``): counts of non-zero |x| over
        [0, ``hist_range``), a power of two >= every earlier batch's; the histogram so far is merged up to it."""
        if self.hist is None:
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
        elif hist_range > self.pow2_hist_range > 0:
            self.hist = merge_pow2(self.hist, int(round(hist_range / self.pow2_hist_range)))
        self.pow2_hist_range = max(self.pow2_hist_range, float(hist_range))
        np.add(self.hist, counts, out=self.hist, casting="unsafe")  # counts: integers, also as float64
        self.zeros += int(zeros)

    # -- results -------------------------------------------------------------------------------------------
    @property
    def absmax(self) -> float:
        return float(max(abs(self.min), abs(self.max)))

    @property
    def hist_range(self) -> float:
        """Upper edge of the histogram's range: R of the one-pass histogram, else absmax (also for a one-pass
        method fed by ``update_histogram`` over [0, absmax])."""
        return self.pow2_hist_range if self.one_pass_histogram and self.pow2_hist_range > 0 else self.absmax

    @property
    def signed_data(self) -> bool:
        return bool(self.min < 0)

    @property
    def levels(self) -> int:
        """Quantized levels of |x| the grid offers: 128 for signed int8, 256 for uint8 on non-negative data."""
        if self.grid.signed or self.signed_data:
            return 2 ** (self.grid.bits - 1)
        return 2 ** self.grid.bits

    @property
    def qmax_abs(self) -> int:
        """Largest integer code for |x| (127 signed int8, 255 uint8 on non-negative data)."""
        return self.levels - 1

    def threshold(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def clipped_share(self, threshold: float) -> float | None:
        """Share of all values with |x| > threshold, from the histogram (None without one)."""
        if threshold >= self.absmax:  # nothing lies beyond the max (a bin's uniform share would say otherwise)
            return 0.0
        if self.hist is None:
            return None
        total = int(self.hist.sum()) + self.zeros
        if total == 0 or self.absmax == 0:
            return 0.0
        width = self.hist_range / self.num_bins
        b = int(np.floor(threshold / width))
        if b >= self.num_bins:
            return 0.0
        frac = threshold / width - b  # part of bin b below T (uniform within a bin)
        clipped = self.hist[b + 1:].sum() + (1.0 - frac) * self.hist[b]
        return float(clipped / total)

    def compute(self) -> RangeResult:
        t = float(self.threshold())
        # the observed range after clipping to [-T, T] (includes 0); symmetric grids use only T
        lo, hi = max(min(self.min, 0.0), -t), min(max(self.max, 0.0), t)
        return RangeResult(threshold=t, lo=float(lo), hi=float(hi), clipped_share=self.clipped_share(t))


#: ``calibrate``'s method when none is given: per tensor the threshold of least expected squared error (clipping +
#: rounding). Over 8 calibration draws on MNIST-5k in ncnn's runtime its logits are 6-8 dB closer to fp32 than
#: KL's (the default before) at equal or better top-1 (``benchmarks/calib_draws.py``, docs/ptq.md)
DEFAULT_METHOD = "mse"

#: name -> calibrator class; add a method with ``@register``
CALIBRATORS: dict[str, type[Calibrator]] = {}


def register(cls: type[Calibrator]) -> type[Calibrator]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    CALIBRATORS[cls.name] = cls
    return cls


def get_calibrator(method: str) -> type[Calibrator]:
    try:
        return CALIBRATORS[method]
    except KeyError:
        raise ValueError(f"unknown calibration method {method!r}; available: {', '.join(sorted(CALIBRATORS))}") \
            from None
