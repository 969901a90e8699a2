"""KL-divergence calibration exactly as ncnn2table (``QuantNet::quantize_KL``) and TensorRT's entropy method do it.

1. range pass: absmax of x over the whole calibration set;
2. histogram pass: 2048 bins of |x| over [0, absmax], exact zeros skipped;
3. normalise; for every candidate ``t`` in [levels, 2048): P = the first t bins + ``eps`` with the tail summed
   into bin t-1; Q = the first t bins of the *unclipped* histogram averaged over ``levels`` equal merged bins
   (fractional bin edges split a bin proportionally), spread back uniformly over the same span, + ``eps``;
   KL(P||Q) = sum P log(P/Q) (no renormalisation, ``eps = 1e-4`` as ncnn);
4. threshold = (best_t + 0.5) * absmax / 2048. ``levels`` = 128 for signed int8 (256 for uint8 on
   non-negative data). The first minimum wins on ties. Step 3 is vectorised over the candidates in NumPy
   (:func:`kl_divergences`, ~9 ms per 2048-bin histogram).

Clip guard (deployq's addition, on by default): KL assumes a smooth, ReLU-like distribution. On tensors dominated
by one value (the normalised MNIST background, signed residual-block inputs) it picks thresholds far below the
data (ncnn-int8.md §9; MXNet's ``entropy`` mode loses 15-55 points the same way, peers.md). When the KL threshold
clips more than ``max_clipped_share`` of the non-zero values, the threshold is raised to the smallest bin edge
that clips at most that share, and a warning names the tensor. ``max_clipped_share=None`` gives ncnn2table's
result unchanged.

``one_pass=True`` (not ncnn2table's result): the same search on the one-pass histogram of percentile/mse,
``num_bins`` bins over [0, R), R the power of two above the max |x| (at least num_bins / 2 bins below the max),
as if ncnn's absmax were R; threshold = (best_t + 0.5) * R / num_bins, at most the max. The data is read once
instead of twice.
"""

from __future__ import annotations

import functools

import numpy as np

from ..profiles import TensorGrid
from .base import Calibrator, check_pow2_bins, register

KL_EPS = 1e-4


def _integral(prefix: np.ndarray, dens: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Integral over [0, x) of a step function with unit-width steps ``dens`` (prefix = cumsum with a leading 0)."""
    f = np.minimum(np.floor(x).astype(np.int64), len(dens) - 1)
    return prefix[f] + (x - f) * dens[f]


@functools.lru_cache(maxsize=4)
def _grid(n: int, levels: int) -> tuple[np.ndarray, ...]:
    """The parts of :func:`kl_divergences` that depend only on the histogram length and ``levels`` (candidate t,
    merged-bin edges and their floor/fraction/ceil indices), computed once per (n, levels); read-only."""
    ti = np.arange(levels, n)
    t = ti.astype(np.float64)[:, None]  # (T, 1)
    npb = t / levels
    e = np.arange(levels + 1, dtype=np.float64)[None, :] * npb  # merged-bin edges, e[:, -1] = t (T, L + 1)
    fl = np.floor(e)
    f = e - fl  # > 0 where an edge falls inside bin floor(e)
    fi = np.minimum(fl.astype(np.int64), n - 1)
    ci = fi + (f > 0)  # ceil(e)
    fb, kb = f[:, 1:-1], fi[:, 1:-1]  # inner edges
    inside = fb > 0
    out = (ti, npb, f, fi, np.ascontiguousarray(fi[:, 1:]), np.ascontiguousarray(ci[:, :-1]), fb, kb, inside)
    for a in out:
        a.flags.writeable = False
    return out


def kl_divergences(hist: np.ndarray, levels: int = 128, eps: float = KL_EPS) -> np.ndarray:
    """KL(P_t || Q_t) for every candidate t in [levels, len(hist)), vectorised over t in O(levels) per t.

    With ``pe = h + eps``: ``KL = sum_k P_k log P_k - sum_k P_k log Q_k``. The first sum is a prefix sum of
    ``pe log pe`` plus the last bin (which carries the tail). ``Q_k = q_j + eps`` on the bins inside merged bin
    j, so the second sum is ``sum_j log(q_j + eps) * (pe summed over those bins)`` (prefix sums), plus one term
    per merged-bin edge that falls inside a bin (``Q_k = f q_j + (1 - f) q_{j+1} + eps``), plus the tail times
    ``log(q_last + eps)``. ``levels`` is a power of two, so ``t / levels`` and every edge are exact in float64.
    Equal to the literal ncnn2table loop (tests/calib/test_methods.py) up to float rounding. The index arrays,
    which do not depend on the histogram, are cached (:func:`_grid`).
    """
    h = np.asarray(hist, dtype=np.float64)
    n = len(h)
    total = h.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    h = h / total
    prefix = np.concatenate([[0.0], np.cumsum(h)])
    tail = prefix[-1] - prefix  # tail[t] = sum(h[t:])
    pe = h + eps
    sp = np.concatenate([[0.0], np.cumsum(pe)])
    spl = np.concatenate([[0.0], np.cumsum(pe * np.log(pe))])
    ti, npb, f, fi, fi_hi, ci_lo, fb, kb, inside = _grid(n, int(levels))
    integ = prefix[fi] + f * h[fi]  # integral of h over [0, e)
    q = np.diff(integ, axis=1) / npb  # mean density of each merged bin (T, L)
    lq = np.log(q + eps)
    inner = sp[fi_hi] - sp[ci_lo]  # pe summed over the bins wholly inside each merged bin
    cross = np.einsum("ij,ij->i", lq, inner)
    mix = fb * q[:, :-1] + (1.0 - fb) * q[:, 1:] + eps
    cross += np.einsum("ij,ij->i", np.where(inside, pe[kb], 0.0), np.log(mix))
    last = pe[ti - 1] + tail[ti]
    cross += tail[ti] * lq[:, -1]
    return spl[ti - 1] + last * np.log(last) - cross


def kl_best_bin(hist: np.ndarray, levels: int = 128, eps: float = KL_EPS) -> int:
    """The ncnn ``target_threshold``: the candidate bin count t with the smallest KL (first on ties)."""
    if len(hist) <= levels:
        raise ValueError(f"need more than {levels} histogram bins, got {len(hist)}")
    return levels + int(np.argmin(kl_divergences(hist, levels, eps)))


@register
class KLCalibrator(Calibrator):
    name = "kl"
    uses_histogram = True
    parallel_compute = True  # the KL search, ~9 ms per tensor in NumPy, mostly outside the GIL

    def __init__(self, grid: TensorGrid | None = None, num_bins: int = 2048, eps: float = KL_EPS,
                 max_clipped_share: float | None = 1e-3, one_pass: bool = False):
        self.one_pass_histogram = bool(one_pass)
        self.num_bins = check_pow2_bins(num_bins) if one_pass else int(num_bins)
        self.eps = float(eps)
        if max_clipped_share is not None and not 0.0 < max_clipped_share < 1.0:
            raise ValueError(f"max_clipped_share must be in (0, 1) or None, got {max_clipped_share}")
        self.max_clipped_share = max_clipped_share
        super().__init__(grid)
        most = 2 ** self.grid.bits if not self.grid.signed else 2 ** (self.grid.bits - 1)
        if self.num_bins <= most:
            raise ValueError(f"num_bins must exceed the {most} quantized levels of the {self.grid.bits}-bit grid, "
                             f"got {self.num_bins}")
        self.best_bin: int | None = None
        self.guarded = False

    def threshold(self) -> float:
        if self.hist is None or self.hist.sum() == 0:
            return 0.0
        self.best_bin = kl_best_bin(self.hist, self.levels, self.eps)
        t = self.best_bin
        if self.max_clipped_share is not None:
            tail = self.hist[::-1].cumsum()[::-1] / self.hist.sum()  # tail[k] = share of values in bins >= k
            ok = np.flatnonzero(tail <= self.max_clipped_share)
            floor_bin = int(ok[0]) if len(ok) else self.num_bins
            if floor_bin > t + 1:
                self.guarded = True
                return min(min(floor_bin, self.num_bins) * self.hist_range / self.num_bins, self.absmax)
        return min((t + 0.5) * self.hist_range / self.num_bins, self.absmax)
