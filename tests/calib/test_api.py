"""calibrate() on small plain fp32 Gluon nets, the scale file and every bad-input path."""

import json
import tracemalloc
import warnings

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import (
    CalibrationError,
    CalibrationWarning,
    ScaleFileError,
    calibrate,
    class_balanced_sampler,
    load,
    report,
)
from deployq.calib.scalefile import ScaleFile
from mxnet import gluon


class Net(gluon.HybridBlock):
    def __init__(self, act=True, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.features = gluon.nn.HybridSequential()
            self.features.add(gluon.nn.Conv2D(4, 3, padding=1), gluon.nn.BatchNorm())
            if act:
                self.features.add(gluon.nn.Activation("relu"))
            self.features.add(gluon.nn.Conv2D(4, 3, padding=1), gluon.nn.Activation("relu"))
            self.output = gluon.nn.Dense(3)

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def make_net(seed=0, act=True):
    mx.random.seed(seed)
    net = Net(act=act)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    return net


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)


def quiet_calibrate(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return calibrate(*a, quiet=True, **kw)


@pytest.mark.parametrize("method", ["minmax", "ema", "kl", "percentile", "mse"])
def test_calibrate_every_layer(method, data):
    net = make_net()
    sf = quiet_calibrate(net, data, method=method, batch_size=16)
    assert list(sf.tensors) == ["features.0:input", "features.3:input", "output:input"]
    r0 = sf.tensors["features.0:input"]
    assert r0.tensor == "data" and r0.samples == 40 and r0.method == method
    assert r0.observed_max == pytest.approx(float(data.max()))
    assert r0.observed_min == pytest.approx(float(data.min()))
    assert 0 < r0.threshold <= max(-r0.observed_min, r0.observed_max) + 1e-6
    assert r0.step == pytest.approx(r0.threshold / 127)
    if method == "minmax":
        assert r0.threshold == pytest.approx(np.abs(data).max())


def test_minmax_matches_direct_activations(data):
    net = make_net()
    sf = quiet_calibrate(net, data, method="minmax", batch_size=7)
    relu0 = net.features[:3](mx.nd.array(data)).asnumpy()
    assert sf.tensors["features.3:input"].threshold == pytest.approx(float(relu0.max()), rel=1e-5)
    assert sf.tensors["features.3:input"].lo == 0.0


def test_input_kinds_agree(data):
    net = make_net()
    a = quiet_calibrate(net, data, method="kl", batch_size=10)
    loader = gluon.data.DataLoader(gluon.data.ArrayDataset(data, np.zeros(len(data))), batch_size=10)
    b = quiet_calibrate(net, loader, method="kl")
    c = quiet_calibrate(net, [mx.nd.array(data[i:i + 10]) for i in range(0, 40, 10)], method="kl")
    for k in a.tensors:
        assert a.tensors[k].threshold == pytest.approx(b.tensors[k].threshold)
        assert a.tensors[k].threshold == pytest.approx(c.tensors[k].threshold)
    assert a.tensors["features.0:input"].data_hash == b.tensors["features.0:input"].data_hash
    d = quiet_calibrate(net, data, method="kl", num_batches=2, batch_size=10)
    assert d.tensors["features.0:input"].samples == 20


def test_onnx_profile_uint8(data):
    sf = quiet_calibrate(make_net(), data, method="minmax", profile="onnx")
    r = sf.tensors["features.3:input"]  # post-ReLU
    assert r.signed is False and r.zero_point == 0 and r.step == pytest.approx(r.hi / 255)
    r = sf.tensors["features.0:input"]
    assert r.zero_point > 0 and r.step == pytest.approx((r.hi - r.lo) / 255)


def test_scalefile_round_trip_and_validation(tmp_path, data):
    sf = quiet_calibrate(make_net(), data, method="percentile", percentile=99.0)
    p = sf.save(tmp_path / "s.json")
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    back = load(p, expect_fingerprint=sf.fingerprint)
    assert back.to_dict() == sf.to_dict()
    d = json.loads(p.read_text())
    assert d["schema"] == "deployq.scales" and d["version"] == 1
    with pytest.raises(ScaleFileError, match=sf.fingerprint + ".*this model sha256:0000"):
        load(p, expect_fingerprint="sha256:0000")
    with pytest.raises(ScaleFileError, match="version 2"):
        ScaleFile.from_dict({**d, "version": 2})
    with pytest.raises(ScaleFileError, match="unknown schema"):
        ScaleFile.from_dict({**d, "schema": "other"})
    bad = json.loads(p.read_text())
    del bad["tensors"]["output:input"]["threshold"], bad["tensors"]["output:input"]["step"]
    with pytest.raises(ScaleFileError, match="missing fields threshold, step"):
        ScaleFile.from_dict(bad)
    del bad["profile"]
    with pytest.raises(ScaleFileError, match="missing fields profile"):
        ScaleFile.from_dict(bad)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ScaleFileError, match="not valid JSON"):
        load(tmp_path / "x.json")


def test_report_lists_layers(data):
    text = report(quiet_calibrate(make_net(), data, method="kl"))
    assert "features.3:input" in text and "clipped" in text and "T/max" in text


def test_guard_rail_warns_naming_layer():
    rng = np.random.default_rng(0)
    x = rng.laplace(size=(64, 1, 8, 8)).astype(np.float32)
    x[0, 0, 0, 0] = 80.0
    with pytest.warns(CalibrationWarning, match="layer features.0: percentile .* signed tensor cut"):
        calibrate(make_net(), x, method="percentile", percentile=99.0, quiet=True)


def test_bad_inputs(data):
    net = make_net()
    with pytest.raises(CalibrationError, match="no calibration data"):
        calibrate(net, [], quiet=True)
    with pytest.raises(CalibrationError, match="no calibration data"):
        calibrate(net, data[:0], quiet=True)
    bad = data.copy()
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(CalibrationError, match="NaN .* features.0"):
        calibrate(net, bad, method="minmax", quiet=True)
    bad[3, 0, 2, 2] = np.inf
    with pytest.raises(CalibrationError, match="Inf .* features.0"):
        calibrate(net, bad, method="minmax", quiet=True)
    with pytest.raises(CalibrationError, match=r"features.0 is zero on every calibration image"):
        calibrate(net, np.zeros_like(data), method="kl", quiet=True)
    with pytest.warns(CalibrationWarning, match="constant-zero"):
        sf = calibrate(net, np.zeros_like(data), method="minmax", quiet=True, zero_threshold=1.0)
    assert sf.tensors["features.0:input"].threshold == 1.0
    with pytest.raises(CalibrationError, match="one-shot iterator"):
        calibrate(net, iter([data]), method="kl", quiet=True)
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibrate(net, data, method="entropy", quiet=True)
    with pytest.raises(TypeError, match="percentile"):
        calibrate(net, data, method="kl", percentile=99.0, quiet=True)
    with pytest.raises(ValueError, match="unknown profile"):
        calibrate(net, data, profile="tensorrt", quiet=True)


def test_mismatched_model_fingerprint(data, tmp_path):
    a = quiet_calibrate(make_net(act=True), data, method="minmax")
    b_net = gluon.nn.HybridSequential()
    b_net.add(gluon.nn.Conv2D(8, 3), gluon.nn.Dense(3))
    b_net.initialize()
    b = quiet_calibrate(b_net, data, method="minmax")
    assert a.fingerprint != b.fingerprint
    p = a.save(tmp_path / "a.json")
    with pytest.raises(ScaleFileError, match="different model"):
        load(p, expect_fingerprint=b.fingerprint)


def test_memory_does_not_grow_with_images():
    net = make_net()
    rng = np.random.default_rng(0)
    peaks = []
    for n in (64, 640):
        x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
        quiet_calibrate(net, x[:16], method="kl")  # warm-up (graph build)
        tracemalloc.start()
        quiet_calibrate(net, x, method="kl", batch_size=16)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0] + 200_000


def test_class_balanced_sampler_deterministic():
    y = np.repeat(np.arange(10), 50)
    a, b = class_balanced_sampler(y, 5, seed=3), class_balanced_sampler(y, 5, seed=3)
    assert np.array_equal(a, b) and len(a) == 50
    assert np.bincount(y[a]).tolist() == [5] * 10
    assert not np.array_equal(a, class_balanced_sampler(y, 5, seed=4))


def test_cli_register_parses():
    import argparse

    from deployq.calib.cli import register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["calibrate", "resnet20", "--method", "mse", "--num-sample", "3", "--out", "s.json",
                           "--report", "--quiet"])
    assert (a.model_pos, a.method, a.num_sample, a.out, a.report, a.quiet) == ("resnet20", "mse", 3, "s.json", True,
                                                                              True)
