"""Calibration maths against independent NumPy references (synthetic data with known answers)."""

import math

import numpy as np
import pytest
from deployq.calib.base import get_calibrator
from deployq.calib.histogram import abs_histogram
from deployq.calib.kl import kl_best_bin
from deployq.calib.mse import mse_errors
from deployq.calib.percentile import percentile_from_histogram

from deployq.profiles import load_profile


def ref_kl_best_bin(hist, target_bin=128, eps=1e-4):
    """Literal transcription of ncnn2table's loop (one candidate at a time, explicit bin edges)."""
    h = np.asarray(hist, dtype=np.float64)
    h = h / h.sum()
    n = len(h)
    best, best_t = math.inf, target_bin
    for t in range(target_bin, n):
        clip = [eps + h[j] for j in range(t)]
        clip[t - 1] += h[t:].sum()
        npb = t / target_bin
        q = [0.0] * target_bin
        spans = []
        for j in range(target_bin):
            start = j * npb
            end = t if j == target_bin - 1 else (j + 1) * npb
            lu, rl = math.ceil(start), math.floor(end)
            ls, rs = lu - start, end - rl
            v = 0.0
            if ls > 0:
                v += ls * h[lu - 1]
            if rs > 0 and rl < n:
                v += rs * h[rl]
            v += sum(h[lu:rl])
            q[j] = v / (end - start)
            spans.append((lu, rl, ls, rs))
        expand = [eps] * t
        for j, (lu, rl, ls, rs) in enumerate(spans):
            if ls > 0:
                expand[lu - 1] += ls * q[j]
            if rs > 0 and rl < t:
                expand[rl] += rs * q[j]
            for k in range(lu, rl):
                expand[k] += q[j]
        kl = sum(a * math.log(a / b) for a, b in zip(clip, expand, strict=False))
        if kl < best:
            best, best_t = kl, t
    return best_t


def _hist(x, bins=2048):
    return abs_histogram(x, float(np.abs(x).max()), bins)


@pytest.mark.parametrize("dist", ["laplace_outlier", "gauss_outlier", "relu_gauss"])
def test_kl_matches_reference_best_bin(dist):
    rng = np.random.default_rng(1)
    if dist == "laplace_outlier":
        x = np.concatenate([rng.laplace(size=20000), [30.0, -25.0]])
    elif dist == "gauss_outlier":
        x = np.concatenate([rng.normal(size=20000), [12.0]])
    else:
        x = np.maximum(rng.normal(size=20000), 0)
    h, _ = _hist(x, 512)  # smaller histogram keeps the pure-Python reference fast
    assert kl_best_bin(h, 128) == ref_kl_best_bin(h, 128)


def test_kl_uniform_keeps_max_and_outliers_clip():
    rng = np.random.default_rng(0)
    cal = get_calibrator("kl")(load_profile("ncnn").activation)
    x = rng.uniform(-1, 1, 100000).astype(np.float32)
    cal.update_range(x.min(), x.max(), x.size)
    cal.update_histogram(*_hist(x))
    assert cal.threshold() > 0.95 * np.abs(x).max()
    cal = get_calibrator("kl")(load_profile("ncnn").activation)
    x = np.concatenate([rng.laplace(size=100000), [60.0]]).astype(np.float32)
    cal.update_range(x.min(), x.max(), x.size)
    cal.update_histogram(*_hist(x))
    t = cal.threshold()
    assert 3.0 < t < 0.5 * 60.0
    assert t == pytest.approx((cal.best_bin + 0.5) * 60.0 / 2048)


def test_kl_levels_follow_profile():
    prof_s, prof_u = load_profile("ncnn"), load_profile("onnx")
    cs, cu = get_calibrator("kl")(prof_s.activation), get_calibrator("kl")(prof_u.activation)
    for c in (cs, cu):
        c.update_range(0.0, 1.0, 10)
    assert cs.levels == 128 and cu.levels == 256
    cu.update_range(-1.0, 1.0, 10)  # signed data on a uint8 grid: |x| histogram, 128 levels
    assert cu.levels == 128


def test_histogram_skips_zeros_and_matches_ncnn_binning():
    x = np.array([0, 0, 0.5, -1.0, 0.999, 0.25], dtype=np.float32)
    h, z = abs_histogram(x, 1.0, 4)
    assert z == 2
    assert h.tolist() == [0, 1, 1, 2]  # 0.25 -> bin 1, 0.5 -> bin 2, 0.999 and 1.0 -> bin 3 (clamped)


def test_percentile_against_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, size=200000)
    amax = float(np.abs(x).max())
    h, z = abs_histogram(x, amax, 2048)
    for p in (99.0, 99.9, 99.99):
        got = percentile_from_histogram(h, z, amax, p)
        assert abs(got - np.percentile(np.abs(x), p)) <= amax / 2048


def test_mse_against_brute_force():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=50000), rng.normal(0, 8, 50)])
    amax = float(np.abs(x).max())
    h, _ = abs_histogram(x, amax, 256)
    err = mse_errors(h, amax, 127)
    w = amax / 256
    c = (np.arange(256) + 0.5) * w
    brute = []
    for i in range(256):
        T = (i + 1) * w
        e = np.sum(h[c > T] * (c[c > T] - T) ** 2) + (T / 127) ** 2 / 12 * h[c <= T].sum()
        brute.append(e)
    np.testing.assert_allclose(err, brute, rtol=1e-9, atol=1e-12)
    # the chosen threshold is near-optimal for the real quantization error of the raw data
    def real_mse(T):
        s = T / 127
        return np.mean((np.clip(np.round(x / s), -127, 127) * s - x) ** 2)
    cand = (np.arange(256) + 1) * w
    best = min(real_mse(T) for T in cand[::4])
    assert real_mse(cand[int(np.argmin(err))]) <= 1.1 * best


def test_ema_first_batch_initialises():
    cal = get_calibrator("ema")(momentum=0.9)
    cal.update_range(-1.0, 2.0, 10)
    assert cal.threshold() == 2.0
    cal.update_range(-1.0, 4.0, 10)
    assert cal.threshold() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert cal.absmax == 4.0
    with pytest.raises(ValueError):
        get_calibrator("ema")(momentum=1.5)


def test_minmax_and_registry():
    cal = get_calibrator("minmax")()
    cal.update_range(-3.0, 2.0, 5)
    r = cal.compute()
    assert (r.threshold, r.lo, r.hi, r.clipped_share) == (3.0, -3.0, 2.0, 0.0)
    with pytest.raises(ValueError, match="available"):
        get_calibrator("entropy")


def test_state_does_not_grow_with_batches():
    rng = np.random.default_rng(0)
    sizes = []
    for nbatch in (10, 100):
        cal = get_calibrator("kl")()
        cal.update_range(-5.0, 5.0, 1)
        for _ in range(nbatch):
            x = rng.normal(size=4096).astype(np.float32)
            cal.update_range(x.min(), x.max(), x.size)
            cal.update_histogram(*abs_histogram(x, 5.0))
        sizes.append(cal.hist.nbytes + len(vars(cal)))
    assert sizes[0] == sizes[1]


def test_kl_clip_guard_on_a_dominant_value():
    """Normalised-MNIST-like data: 80% of |x| sit at one background value. ncnn's KL clips far below the data;
    the guard raises the threshold until at most 0.1% of the values are clipped; None keeps ncnn's choice."""
    from deployq.calib.kl import KLCalibrator

    rng = np.random.default_rng(3)
    x = np.concatenate([np.full(80_000, -0.4242), rng.uniform(0, 2.82, 20_000)]).astype(np.float32)
    res = {}
    for share in (None, 1e-3):
        cal = KLCalibrator(max_clipped_share=share)
        cal.update_range(x.min(), x.max(), x.size)
        counts, _ = np.histogram(np.abs(x), bins=2048, range=(0, np.abs(x).max()))
        cal.update_histogram(counts, 0)
        res[share] = cal.threshold()
    assert res[None] < 1.0  # ncnn2table's threshold cuts most of the digit strokes
    assert np.mean(np.abs(x) > res[1e-3]) <= 1e-3 < np.mean(np.abs(x) > res[None])
