"""The in-place reader (``dq_raw_stats``, deployq/native/rawstats.cc) gives the in-graph operator's numbers on
oneDNN-layout activations, refuses what it cannot read, and the one-pass power-of-two histogram (percentile, mse)
equals the histogram computed directly over the final range."""

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import calibrate
from deployq.calib.base import check_pow2_bins, merge_pow2, pow2_range
from deployq.calib.collect import ActivationTap
from deployq.calib.histogram import abs_histogram
from deployq.calib.mse import MSECalibrator
from deployq.calib.percentile import PercentileCalibrator, percentile_from_histogram
from mxnet import gluon

from deployq.native import calibops, rawstats

needs_raw = pytest.mark.skipif(rawstats.load() is None or not calibops.available(),
                               reason="in-place reader not available (no compiler, or MXNet without oneDNN)")


def _net(channels=(8, 16, 32, 3)):
    mx.random.seed(0)
    net = gluon.nn.HybridSequential()
    for c in channels:
        net.add(gluon.nn.Conv2D(c, 3, padding=1), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"))
    net.add(gluon.nn.Dense(4))
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True)
    return net


def _x(n=10, seed=0):
    return mx.nd.array(np.random.default_rng(seed).normal(size=(n, 3, 12, 12)).astype(np.float32))


@needs_raw
@pytest.mark.parametrize("mode", ["range", "clip", "hist", "pow2"])
def test_raw_reader_equals_graph_operator(mode):
    net = _net()
    x = _x()
    net(x)
    tap = ActivationTap(net)
    k = len(tap.internals)
    rng = np.random.default_rng(1)
    aux = {"range": None, "clip": np.tile([0.5, 2.0, 1.0, 0.9], k), "hist": rng.uniform(0.5, 4.0, k),
           "pow2": np.where(np.arange(k) % 2 == 0, 0.0, 2.0)}[mode]
    for batch in (x, _x(10, 1), _x(3, 2)):  # the second batch writes into the outputs kept from the first
        raw = tap._raw_stats(batch, mode, 256, aux)
        assert raw is not None, "a tensor could not be read in place"
        np.testing.assert_array_equal(raw, tap._graph_stats(batch, mode, 256, aux))
    assert tap.raw_ok is not False


@needs_raw
def test_raw_reader_refuses_other_dtypes():
    a, ones = mx.nd.array(np.ones((4, 4)), dtype=np.float64), mx.nd.ones((2, 3))
    mx.nd.waitall()  # the reader is given computed arrays
    out = np.empty(2)
    assert rawstats.raw_stats([ones, a], "range", 2048, None, out) == 2  # 1 + the index of the refused array
    assert rawstats.raw_stats([ones], "range", 2048, None, out) == 0
    assert out.tolist() == [1.0, 1.0]


@needs_raw
def test_calibrate_uses_the_raw_reader_and_checks_it(monkeypatch):
    net = _net()
    data = np.random.default_rng(3).normal(size=(40, 3, 12, 12)).astype(np.float32)
    ref = calibrate(net, data, method="minmax", quiet=True, batch_size=16)
    from deployq.calib import api

    tap = api._TAP_CACHE[0][2]
    assert tap.raw_ok is not False and {k[0] for k in tap._raw_checked} == {"range"}
    # a reader that disagrees with the operator is caught on the first batch and dropped
    monkeypatch.setattr(ActivationTap, "_raw_stats", lambda self, *a: np.zeros_like(self._graph_stats(*a)))
    tap._raw_checked.clear()
    with pytest.warns(RuntimeWarning, match="in-place activation statistics differ"):
        again = calibrate(net, data, method="minmax", quiet=True, batch_size=16)
    assert tap.raw_ok is False
    assert again.to_dict()["tensors"] == ref.to_dict()["tensors"]


def test_pow2_range():
    assert pow2_range(0.7, 0.0) == 1.0
    assert pow2_range(1.0, 0.0) == 2.0  # strictly above the max
    assert pow2_range(3.0, 8.0) == 8.0  # never shrinks
    assert pow2_range(9.0, 8.0) == 16.0
    assert pow2_range(0.0, 0.0) == 0.0
    assert pow2_range(1e-30, 0.0) == 2.0 ** -99


@pytest.mark.parametrize("bins", [16, 4096])
def test_one_pass_histogram_equals_direct_histogram(bins):
    """Batches with growing max |x|: merging the histogram when R grows gives, count for count, the histogram of
    all the values computed at once over the final R."""
    rng = np.random.default_rng(5)
    batches = [rng.normal(0, s, 5000).astype(np.float32) for s in (0.01, 0.3, 0.2, 5.0, 1.0, 70.0, 3.0)]
    batches[2][:100] = 0.0
    cal = PercentileCalibrator(num_bins=bins)
    for b in batches:
        cal.update_range(float(b.min()), float(b.max()), b.size)
        r = pow2_range(float(np.abs(b).max()), cal.pow2_hist_range)
        cal.update_pow2_histogram(*abs_histogram(b, r, bins), r)
    allx = np.concatenate(batches)
    counts, zeros = abs_histogram(allx, cal.hist_range, bins)
    assert cal.hist_range == pow2_range(float(np.abs(allx).max()), 0.0)
    np.testing.assert_array_equal(cal.hist, counts)
    assert cal.zeros == zeros == 100
    t = cal.compute().threshold
    assert t == percentile_from_histogram(counts, zeros, cal.hist_range, 99.99, cap=cal.absmax) <= cal.absmax


def test_merge_pow2_and_bins_check():
    h = np.arange(8)
    assert merge_pow2(h, 2).tolist() == [1, 5, 9, 13, 0, 0, 0, 0]
    assert merge_pow2(h, 16).tolist() == [28, 0, 0, 0, 0, 0, 0, 0]
    for bad in (1000, 1, 3.5):
        with pytest.raises(ValueError, match="power of two"):
            check_pow2_bins(bad)
    with pytest.raises(ValueError, match="power of two"):
        MSECalibrator(num_bins=2000)


@pytest.mark.skipif(not calibops.available(), reason="no C++ compiler: fused calibration operator off")
def test_pow2_operator_matches_numpy():
    rng = np.random.default_rng(6)
    arrays = [rng.normal(0, 2, 999).astype(np.float32), np.zeros(40, np.float32),
              np.array([1.0, -1.0, 0.5, 0.0, -0.0, 2.0 ** -140], np.float32)]
    aux = [0.0, 0.0, 4.0]
    out = mx.nd.dq_calib_stats(*[mx.nd.array(a) for a in arrays], mx.nd.array(aux, dtype=np.float64), mode="pow2",
                               num_inputs=3, num_bins=64).asnumpy().reshape(3, -1)
    for a, r0, row in zip(arrays, aux, out, strict=True):
        r = pow2_range(float(np.abs(a).max()), r0)
        assert row[:3].tolist() == [float(a.min()), float(a.max()), r]
        if r > 0:
            counts, zeros = abs_histogram(a, r, 64)
        else:
            counts, zeros = np.zeros(64), a.size
        assert row[3:67].tolist() == counts.tolist() and row[67] == zeros


def test_tap_cache_follows_the_net():
    """calibrate() reuses its tap graph for the same net and rebuilds it when a block changes."""
    from deployq.calib import api

    net = _net((8, 16))
    data = np.random.default_rng(7).normal(size=(20, 3, 12, 12)).astype(np.float32)
    a = calibrate(net, data, method="minmax", quiet=True)
    tap = api._TAP_CACHE[0][2]
    calibrate(net, data, method="minmax", quiet=True)
    assert api._TAP_CACHE[0][2] is tap
    net[2]._act_type = "tanh"  # the first ReLU becomes tanh in place: the next layer's input turns signed
    b = calibrate(net, data, method="minmax", quiet=True)
    assert api._TAP_CACHE[0][2] is not tap
    key = "3:input"
    assert a.tensors[key].observed_min >= 0 > b.tensors[key].observed_min


@needs_raw
def test_input_only_tap(monkeypatch):
    """A net whose only quantized layer reads the graph input: nothing to run, the input is read in place."""
    from deployq.calib import api

    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4))
    net.initialize()
    net.hybridize()
    x = np.random.default_rng(8).normal(size=(20, 6)).astype(np.float32)
    files = []
    for native in (None, False):
        monkeypatch.setattr(api, "NATIVE", native)
        files.append([calibrate(net, x, method=m, quiet=True, batch_size=8).to_dict()["tensors"]
                      for m in ("minmax", "percentile", "kl")])
    assert files[0] == files[1]
    assert files[0][0]["0:input"]["observed_max"] == float(x.max())


def test_dataloader_with_workers():
    """A DataLoader with workers yields cpu_shared batches: calibrate moves them to the net's context and gets
    the numbers of the same images given as an array."""
    net = _net((8,))
    x = np.random.default_rng(9).normal(size=(24, 3, 12, 12)).astype(np.float32)
    dl = gluon.data.DataLoader(gluon.data.ArrayDataset(x, np.zeros(len(x))), batch_size=8, num_workers=2)
    assert next(iter(dl))[0].context.device_type == "cpu_shared"
    for method in ("minmax", "kl"):
        a = calibrate(net, dl, method=method, quiet=True)
        b = calibrate(net, x, method=method, quiet=True, batch_size=8)
        assert a.to_dict()["tensors"] == b.to_dict()["tensors"]


def test_one_pass_kl():
    """kl(one_pass=True): ncnn's KL search on the one-pass histogram, as if absmax were R; at most the max."""
    from deployq.calib.kl import KLCalibrator, kl_best_bin

    rng = np.random.default_rng(10)
    batches = [np.maximum(rng.normal(0, s, 20000), 0).astype(np.float32) for s in (1.0, 2.5, 0.7)]
    cal = KLCalibrator(one_pass=True, max_clipped_share=None)
    assert cal.one_pass_histogram and not KLCalibrator().one_pass_histogram
    for b in batches:
        cal.update_range(float(b.min()), float(b.max()), b.size)
        r = pow2_range(float(np.abs(b).max()), cal.pow2_hist_range)
        cal.update_pow2_histogram(*abs_histogram(b, r, 2048), r)
    res = cal.compute()
    t = kl_best_bin(cal.hist, cal.levels)
    assert res.threshold == min((t + 0.5) * cal.hist_range / 2048, cal.absmax) <= cal.absmax
    assert cal.hist_range == 16.0 and cal.absmax < 16.0
    with pytest.raises(ValueError, match="power of two"):
        KLCalibrator(one_pass=True, num_bins=2000)
    assert KLCalibrator(num_bins=2000).num_bins == 2000  # ncnn's histogram takes any bin count


def test_threshold_at_max_clips_nothing():
    cal = PercentileCalibrator(num_bins=16)
    x = np.linspace(0, 3.0, 1001, dtype=np.float32)
    cal.update_range(0.0, 3.0, x.size)
    cal.update_pow2_histogram(*abs_histogram(x, 4.0, 16), 4.0)
    assert cal.clipped_share(3.0) == 0.0 and cal.clipped_share(2.0) > 0.3


@needs_raw
@pytest.mark.parametrize("mode", ["range", "hist", "pow2"])
def test_raw_totals_equal_the_per_batch_vectors_added_up(mode):
    from deployq.calib.totals import PassTotals

    net = _net()
    net(_x())
    tap = ActivationTap(net)
    k = len(tap.internals)
    absmax = np.random.default_rng(2).uniform(1.0, 6.0, k) if mode == "hist" else None
    native, numpy_ = PassTotals(k, mode, 256, absmax), PassTotals(k, mode, 256, absmax)
    for i, scale in enumerate((0.5, 3.0, 1.0, 40.0)):  # pow2: R grows twice, by 8x and by 16x or more
        batch = _x(6, i) * scale
        arrays = tap._raw_arrays(batch)
        assert rawstats.raw_totals(arrays, mode, 256, native.aux(), native.buffer) == 0
        native.count += tap.size_array(tuple(batch.shape))
        numpy_.add(tap._raw_stats(batch, mode, 256, numpy_.aux()).copy(), tap.size_array(tuple(batch.shape)))
    np.testing.assert_array_equal(native.buffer, numpy_.buffer)
    if mode == "pow2":
        assert (native.hist_range >= 16).all()
    # a refused array leaves the totals as they were
    before = native.buffer.copy()
    bad = mx.nd.array(np.ones((2, 2)), dtype=np.float64)
    assert rawstats.raw_totals([*tap._raw_arrays(_x(6, 9)), bad], mode, 256,
                               None if absmax is None else np.append(absmax, 1.0), native.buffer) == k + 1
    np.testing.assert_array_equal(native.buffer, before)


def test_pass_totals_keep_a_nan():
    from deployq.calib.totals import PassTotals

    t = PassTotals(2, "range", 0)
    t.add(np.array([-1.0, 2.0, 0.0, 1.0]), np.array([4, 4]))
    t.add(np.array([np.nan, np.nan, -0.5, 0.5]), np.array([4, 4]))
    t.add(np.array([-3.0, 3.0, -0.5, 0.5]), np.array([4, 4]))
    assert t.bad_tensor() == 0 and t.count.tolist() == [12, 12]
    assert t.lo[1] == -0.5 and t.hi[1] == 1.0


@needs_raw
@pytest.mark.parametrize("method", ["minmax", "percentile", "kl", "ema"])
def test_data_hash_is_the_same_on_every_path(monkeypatch, method):
    """The hash is computed while the engine runs a batch on the in-place path; it must equal the hash taken in
    order on the other paths, and SHA-256 over the float32 bytes of the batches, then the total shape."""
    import hashlib

    from deployq.calib import api

    net = _net()
    data = np.random.default_rng(5).normal(size=(40, 3, 12, 12)).astype(np.float32)
    h = hashlib.sha256(data.tobytes())
    h.update(str((40, 3, 12, 12)).encode())
    want = "sha256:" + h.hexdigest()[:16]
    raw = calibrate(net, data, method=method, quiet=True, batch_size=16)
    monkeypatch.setattr(ActivationTap, "_raw_stats", lambda self, *a: None)  # refused: the in-graph operator
    api._TAP_CACHE.clear()
    graph = calibrate(net, data, method=method, quiet=True, batch_size=16)
    monkeypatch.setattr(api, "NATIVE", False)  # NumPy
    host = calibrate(net, data, method=method, quiet=True, batch_size=16)
    for sf in (raw, graph, host):
        assert {r.data_hash for r in sf.tensors.values()} == {want}
    assert raw.to_dict()["tensors"] == graph.to_dict()["tensors"]


@needs_raw
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["range", "pow2"])
def test_totals_pushed_to_the_engine_equal_the_callers(monkeypatch, threads, mode):
    """dq_push_totals (an engine operation after the forward, on the engine's OpenMP threads) adds what
    dq_raw_totals adds in the calling thread; a refused array is reported through rc, the totals unchanged."""
    from deployq.calib.totals import PassTotals

    monkeypatch.setattr(rawstats, "PUSH_THREADS", threads)
    net = _net()
    net(_x())
    tap = ActivationTap(net)
    k = len(tap.internals)
    pushed, called = PassTotals(k, mode, 256), PassTotals(k, mode, 256)
    rc = np.full(1, -7, dtype=np.int32)
    for i, scale in enumerate((0.5, 3.0, 40.0)):
        batch = _x(6, i) * scale
        rawstats.push_totals(tap._raw_arrays(batch, wait=False), mode, 256, pushed.aux(), pushed.buffer, rc)
        mx.nd.waitall()
        assert rc[0] == 0
        assert rawstats.raw_totals(tap._raw_arrays(batch), mode, 256, called.aux(), called.buffer) == 0
    np.testing.assert_array_equal(pushed.buffer, called.buffer)
    before = pushed.buffer.copy()
    bad = mx.nd.array(np.ones((2, 2)), dtype=np.float64)
    rawstats.push_totals([*tap._raw_arrays(_x(6, 9), wait=False), bad], mode, 256, pushed.aux(), pushed.buffer, rc)
    mx.nd.waitall()
    assert rc[0] == k + 1
    np.testing.assert_array_equal(pushed.buffer, before)
