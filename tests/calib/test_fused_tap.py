"""calibrate() reads the activations from oneDNN's fused graph (Conv + BN + ReLU as one operator, BN folded):
the same thresholds as the plain graph up to float rounding, checked on the first batch with a fallback, and the
folding follows parameter changes between calibrations of one cached tap."""

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import api, calibrate
from deployq.calib import collect as collect_mod
from deployq.calib.collect import ActivationTap, fused_outputs
from mxnet import gluon

needs_onednn = pytest.mark.skipif(not mx.runtime.Features().is_enabled("MKLDNN"), reason="MXNet without oneDNN")


def _net():
    mx.random.seed(0)
    net = gluon.nn.HybridSequential()
    for c in (8, 16, 16):
        net.add(gluon.nn.Conv2D(c, 3, padding=1, use_bias=False), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"))
    net.add(gluon.nn.Dense(4))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 10, 10)))  # shapes known before the parameters are set
    rng = np.random.default_rng(0)
    for name, p in net.collect_params().items():  # BN statistics far from identity, so folding matters
        if name.endswith(("running_var", "gamma")):
            p.set_data(mx.nd.array(rng.uniform(0.2, 3.0, p.shape)))
        elif name.endswith(("running_mean", "beta")):
            p.set_data(mx.nd.array(rng.normal(0, 1, p.shape)))
    net.hybridize(static_alloc=True)
    return net


def _data(n=48, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 3, 10, 10)).astype(np.float32)


def _thresholds(sf):
    return {k: r.threshold for k, r in sf.tensors.items()}


@needs_onednn
@pytest.mark.parametrize("method", ["minmax", "kl", "mse"])
def test_fused_graph_gives_the_plain_graphs_thresholds(method):
    net, data = _net(), _data()
    fused = calibrate(net, data, method=method, quiet=True, batch_size=16)
    assert api._TAP_CACHE[0][2].fused is True
    plain = calibrate(net, data, method=method, quiet=True, batch_size=16, fuse=False)
    assert api._TAP_CACHE[0][2].fused is False
    f, p = _thresholds(fused), _thresholds(plain)
    assert f.keys() == p.keys() and len(f) == 4
    for k in f:  # BN folded into the weights: float rounding only (bins may move by one: KL, MSE)
        assert f[k] == pytest.approx(p[k], rel=2e-3 if method != "minmax" else 1e-5), k


@needs_onednn
def test_fused_outputs_fold_batchnorm():
    tap = ActivationTap(_net())
    plain = [s.name for s in tap._plain_syms]
    fused = fused_outputs(tap._plain_syms, tap._inputs)
    assert fused is not None and len(fused) == len(plain)
    ops = {n["op"] for n in __import__("json").loads(mx.sym.Group(fused).tojson())["nodes"]}
    assert "_sg_mkldnn_conv" in ops and "BatchNorm" not in ops


@needs_onednn
def test_a_fused_graph_that_disagrees_falls_back_to_the_plain_graph(monkeypatch):
    net, data = _net(), _data()
    ref = calibrate(net, data, method="minmax", quiet=True, batch_size=16, fuse=False)
    api._TAP_CACHE.clear()
    monkeypatch.setattr(collect_mod, "FUSION_RTOL", -1.0)  # every difference (even none) is too large
    with pytest.warns(RuntimeWarning, match="oneDNN-fused graph"):
        again = calibrate(net, data, method="minmax", quiet=True, batch_size=16)
    assert api._TAP_CACHE[0][2].fused is False
    assert again.to_dict()["tensors"] == ref.to_dict()["tensors"]


@needs_onednn
def test_parameter_changes_reach_the_cached_fused_graph():
    net, data = _net(), _data()
    before = _thresholds(calibrate(net, data, method="minmax", quiet=True, batch_size=16))
    tap = api._TAP_CACHE[0][2]
    params = net.collect_params()
    gamma = next(p for n, p in params.items() if n.endswith("gamma"))
    gamma.set_data(gamma.data() * 4)
    weight = next(p for n, p in params.items() if n.endswith("weight"))
    weight.set_data(weight.data() * 0.25)
    after = calibrate(net, data, method="minmax", quiet=True, batch_size=16)
    assert api._TAP_CACHE[0][2] is tap  # the same graph, folded again
    api._TAP_CACHE.clear()
    fresh = calibrate(net, data, method="minmax", quiet=True, batch_size=16, fuse=False)
    assert _thresholds(after) != before
    for k, t in _thresholds(fresh).items():
        assert _thresholds(after)[k] == pytest.approx(t, rel=1e-5), k
