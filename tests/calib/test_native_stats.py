"""The fused calibration operator (``dq_calib_stats``, deployq/native/calibops.cc) computes what the NumPy path
computes, bit for bit: min/max, EMA clipped counts, ncnn-binned histograms of |x| on ties and edge cases, and
whole calibrations of every method (the scale file's numbers equal with the operator on and off)."""

import warnings

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import CalibrationError, CalibrationWarning, api, calibrate
from deployq.calib.ema import EMACalibrator
from deployq.calib.histogram import abs_histogram
from mxnet import gluon

from deployq.native import calibops

pytestmark = pytest.mark.skipif(not calibops.available(), reason="no C++ compiler: fused calibration operator off")


class Net(gluon.HybridBlock):
    def __init__(self, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.features = gluon.nn.HybridSequential()
            self.features.add(gluon.nn.Conv2D(4, 3, padding=1), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
                              gluon.nn.Conv2D(16, 3, padding=1), gluon.nn.Activation("relu"))
            self.output = gluon.nn.Dense(3)

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def make_net(seed=0):
    mx.random.seed(seed)
    net = Net()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    return net


def _stats(mode, arrays, aux=None, num_bins=2048):
    xs = [mx.nd.array(np.asarray(a, dtype=np.float32).reshape(-1)) for a in arrays]
    args = xs + ([] if aux is None else [mx.nd.array(np.asarray(aux, dtype=np.float64), dtype=np.float64)])
    return mx.nd.dq_calib_stats(*args, mode=mode, num_inputs=len(xs), num_bins=num_bins).asnumpy()


def _edge_values(absmax, bins):
    """Exact bin edges k * absmax / bins (and their float32 neighbours), absmax itself, zeros of both signs,
    subnormals, and random values, each with both signs."""
    edges = (np.arange(bins + 1, dtype=np.float64) * absmax / bins).astype(np.float32)
    near = np.concatenate([edges, np.nextafter(edges, np.float32(0)), np.nextafter(edges, np.float32(np.inf))])
    near = near[near <= np.float32(absmax)]
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, absmax, -absmax], dtype=np.float32)
    rnd = np.random.default_rng(0).uniform(-absmax, absmax, 5000).astype(np.float32)
    v = np.concatenate([near, -near, special, rnd])
    return v[np.abs(v) <= np.float32(absmax)]


@pytest.mark.parametrize("absmax,bins", [(1.0, 4), (3.0, 2048), (0.7, 2048), (6.1234567, 512), (1e-3, 2048),
                                         (255.0, 2048)])
def test_histogram_matches_numpy_on_edges(absmax, bins):
    absmax = float(np.float32(absmax))
    x = _edge_values(absmax, bins)
    for n in (x.size, 7, 8, 255, 257):  # tails of the 8-lane and 256-value blocks
        h, z = abs_histogram(x[:n], absmax, bins)
        out = _stats("hist", [x[:n]], [absmax], bins)
        assert out[:bins].tolist() == h.tolist() and out[bins] == z


def test_histogram_zero_range_and_all_zero():
    x = np.array([0.0, -0.0, 0.0], dtype=np.float32)
    for absmax in (0.0, 1.0):
        h, z = abs_histogram(x, absmax, 16)
        out = _stats("hist", [x], [absmax], 16)
        assert out[:16].tolist() == h.tolist() and out[16] == z == 3


def test_range_matches_numpy_and_flags_nan_inf():
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=n).astype(np.float32) for n in (1, 7, 8, 9, 1000, 4099)]
    out = _stats("range", arrays).reshape(-1, 2)
    assert out[:, 0].tolist() == [float(a.min()) for a in arrays]
    assert out[:, 1].tolist() == [float(a.max()) for a in arrays]
    bad = [np.array([1.0, np.nan, -2.0] * 5, np.float32), np.array([1.0, np.inf] * 9, np.float32),
           np.array([-np.inf, 0.0], np.float32)]
    out = _stats("range", bad).reshape(-1, 2)
    assert np.isnan(out[0]).all()
    assert out[1].tolist() == [1.0, np.inf] and out[2].tolist() == [-np.inf, 0.0]


def test_clip_counts_match_ema_observe():
    rng = np.random.default_rng(2)
    ref, batches = EMACalibrator(momentum=0.8), [rng.normal(0, s, 3001).astype(np.float32) for s in (1, 3, 0.5, 2)]
    batches.append(np.full(17, 2.0, np.float32))  # ties at the threshold
    for a in batches:
        row = ref.state_row()
        out = _stats("clip", [a], row)
        ref.update_range(float(a.min()), float(a.max()), a.size)
        before = ref.clip_count
        ref.observe(a)
        assert out[:2].tolist() == [float(a.min()), float(a.max())]
        assert out[2] == ref.clip_count - before


@pytest.mark.parametrize("method,kw", [("minmax", {}), ("ema", {}), ("ema", {"passes": 2, "momentum": 0.5}),
                                       ("kl", {}), ("kl", {"max_clipped_share": None}), ("kl", {"one_pass": True}),
                                       ("percentile", {}),
                                       ("mse", {}), ("mse", {"num_bins": 256})])
def test_calibrate_native_equals_numpy(method, kw, monkeypatch):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(45, 1, 8, 8)).astype(np.float32)
    data[:, :, :2] = 0.0  # exact zeros at the first layer's input
    net = make_net(1)
    files = []
    for native in (None, False):
        monkeypatch.setattr(api, "NATIVE", native)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            files.append(calibrate(net, data, method=method, quiet=True, batch_size=16, **kw))
    a, b = (f.to_dict()["tensors"] for f in files)
    assert a == b


def test_native_nan_is_an_error(monkeypatch):
    data = np.random.default_rng(4).normal(size=(8, 1, 8, 8)).astype(np.float32)
    data[3, 0, 2, 2] = np.nan
    for native in (None, False):
        monkeypatch.setattr(api, "NATIVE", native)
        with pytest.raises(CalibrationError, match="NaN activations at the input of layer"):
            calibrate(make_net(), data, method="kl", quiet=True)
