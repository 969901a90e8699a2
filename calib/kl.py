"""KL-divergence calibration exactly as ncnn2table (``QuantNet::quantize_KL``) and TensorRT's entropy method do it.

1. range pass: absmax of x over the whole calibration set;
2. histogram pass: 2048 bins of |x| over [0, absmax], exact zeros skipped;
3. normalise; for every candidate ``t`` in [levels, 2048): P = the first t bins + ``eps`` with the tail summed
   into bin t-1; Q = the first t bins of the *unclipped* histogram averaged over ``levels`` equal merged bins
   (fractional bin edges split a bin proportionally), spread back uniformly over the same span, + ``eps``;
   KL(P||Q) = sum P log(P/Q) (no renormalisation, ``eps = 1e-4`` as ncnn);
4. threshold = (best_t + 0.5) * absmax / 2048. ``levels`` = 128 for signed int8 (256 for uint8 on
   non-negative data). The first minimum wins on ties.

Clip guard (deployq's addition, on by default): KL assumes a smooth, ReLU-like distribution. On tensors dominated
by one value (the normalised MNIST background, signed residual-block inputs) it picks thresholds far below the
data (ncnn-int8.md §9; MXNet's ``entropy`` mode loses 15-55 points the same way, peers.md). When the KL threshold
clips more than ``max_clipped_share`` of the non-zero values, the threshold is raised to the smallest bin edge
that clips at most that share, and a warning names the tensor. ``max_clipped_share=None`` gives ncnn2table's
result unchanged.
"""

from __future__ import annotations

import numpy as np

from ..profiles import TensorGrid
from .base import Calibrator, register

KL_EPS = 1e-4


def _integral(prefix: np.ndarray, dens: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Integral over [0, x) of a step function with unit-width steps ``dens`` (prefix = cumsum with a leading 0)."""
    f = np.minimum(np.floor(x).astype(np.int64), len(dens) - 1)
    return prefix[f] + (x - f) * dens[f]


def kl_divergences(hist: np.ndarray, levels: int = 128, eps: float = KL_EPS, chunk: int = 128) -> np.ndarray:
    """KL(P_t || Q_t) for every candidate t in [levels, len(hist)) (vectorised over t, chunked)."""
    h = np.asarray(hist, dtype=np.float64)
    n = len(h)
    total = h.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    h = h / total
    prefix = np.concatenate([[0.0], np.cumsum(h)])
    tail = prefix[-1] - prefix  # tail[t] = sum(h[t:])
    out = np.empty(n - levels)
    k = np.arange(n, dtype=np.float64)[None, :]
    jl = np.arange(levels, dtype=np.float64)[None, :]
    for t0 in range(levels, n, chunk):
        t = np.arange(t0, min(t0 + chunk, n), dtype=np.float64)[:, None]  # (B, 1)
        npb = t / levels
        start, end = jl * npb, (jl + 1) * npb
        end[:, -1] = t[:, 0]
        q = (_integral(prefix, h, end) - _integral(prefix, h, start)) / (end - start)  # mean density (B, L)
        # integral of the expanded step function (value q_j on [j*npb, (j+1)*npb)) at bin edges 0..n
        qprefix = np.concatenate([np.zeros((len(t), 1)), np.cumsum(q * npb, axis=1)], axis=1)
        edges = np.arange(n + 1, dtype=np.float64)[None, :]
        e = np.minimum(edges, t)
        j = np.minimum(np.floor(e / npb).astype(np.int64), levels - 1)
        D = np.take_along_axis(qprefix, j, 1) + (e - j * npb) * np.take_along_axis(q, j, 1)
        expand = np.diff(D, axis=1) + eps  # (B, n); zero width beyond t
        p = h[None, :] + eps
        inside = k < t
        last = k == t - 1
        p = np.where(last, p + tail[t.astype(np.int64)], p)
        p = np.where(inside, p, 1.0)
        expand = np.where(inside, expand, 1.0)
        out[t0 - levels: t0 - levels + len(t)] = np.sum(p * np.log(p / expand), axis=1)
    return out


def kl_best_bin(hist: np.ndarray, levels: int = 128, eps: float = KL_EPS) -> int:
    """The ncnn ``target_threshold``: the candidate bin count t with the smallest KL (first on ties)."""
    if len(hist) <= levels:
        raise ValueError(f"need more than {levels} histogram bins, got {len(hist)}")
    return levels + int(np.argmin(kl_divergences(hist, levels, eps)))


@register
class KLCalibrator(Calibrator):
    name = "kl"
    uses_histogram = True

    def __init__(self, grid: TensorGrid | None = None, num_bins: int = 2048, eps: float = KL_EPS,
                 max_clipped_share: float | None = 1e-3):
        self.num_bins = int(num_bins)
        self.eps = float(eps)
        self.max_clipped_share = max_clipped_share
        super().__init__(grid)
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
                return min(floor_bin, self.num_bins) * self.absmax / self.num_bins
        return (t + 0.5) * self.absmax / self.num_bins
