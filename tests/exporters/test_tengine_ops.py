"""Tengine lowering per op: every op the exporter accepts matches the NumPy int8 reference, and every case
Tengine gets wrong is refused naming the layer."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.tengine import lower as tengine
from deployq.exporters.tengine.reference import TengineReference
from deployq.exporters.tengine.simulate import simulate
from deployq.exporters.tengine.writer import write
from mxnet import gluon
from mxnet.gluon import nn

X = np.random.default_rng(5).normal(size=(64, 3, 16, 16)).astype(np.float32)


class _Cover(gluon.HybridBlock):
    """conv+BN+ReLU6 (fused), depthwise+ReLU, max/avg pooling, concat, sigmoid, leaky, add, global pool,
    flatten, dense, softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(8, 3, padding=1, in_channels=3)
        self.bn = nn.BatchNorm()
        self.dw = nn.Conv2D(8, 3, padding=1, groups=8, in_channels=8)
        self.maxp = nn.MaxPool2D(2, 2)
        self.avgp = nn.AvgPool2D(3, 2, padding=1, count_include_pad=False)
        self.pw = nn.Conv2D(16, 1, in_channels=16)
        self.gap = nn.GlobalAvgPool2D()
        self.flat = nn.Flatten()
        self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):
        y = F.clip(self.bn(self.conv(x)), 0, 6)
        y = F.Activation(self.dw(y), act_type="relu")
        c = F.concat(self.maxp(y), self.avgp(y), dim=1)
        z = F.Activation(self.pw(c), act_type="sigmoid") + F.LeakyReLU(c, slope=0.1)
        return F.softmax(self.fc(self.flat(self.gap(z))))


def _cover_net():
    net = _Cover()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, 3, 16, 16)))
    return net


def test_all_ops_match_reference(tmp_path):
    g = from_gluon(_cover_net(), (1, 3, 16, 16), name="cover")
    exp = tengine.lower_model(g, [X])
    assert exp.fused == {"conv": "relu6", "dw": "relu"}
    ops = [n.op for n in exp.graph.nodes]
    assert "SoftmaxActivation" in ops and "softmax" not in ops and "BatchNorm" not in ops
    paths = write(exp, tmp_path)
    ref = TengineReference(*paths[:3], input_shape=(1, 3, 16, 16))
    xs = np.random.default_rng(6).normal(size=(200, 3, 16, 16)).astype(np.float32)
    sim, out = simulate(exp, xs), ref(xs)
    step = exp.scale_of(exp.tensor_map[exp.graph.outputs[0]]).step
    assert step == pytest.approx(1 / 127)  # softmax output
    assert np.abs(sim - out).max() <= step * (1 + 1e-4)
    # concat output scale covers both inputs
    cat = next(n for n in exp.graph.nodes if n.op == "Concat")
    s = {r.tensor: r.step for r in exp.scales}
    assert s[cat.output] >= max(s[exp.tensor_map[t]] for t in cat.inputs)
    assert f"data {s['data']:.9g} 0\n" in paths[2].read_text()


def _seq(*layers, shape=(1, 3, 16, 16)):
    net = nn.HybridSequential()
    net.add(*layers)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros(shape))
    return net


@pytest.mark.parametrize("layers,msg", [
    (lambda: [nn.Conv2D(4, 3, dilation=2, in_channels=3)], r"layer '0' \(Convolution\): dilation \(2, 2\)"),
    (lambda: [nn.Conv2D(4, 3, in_channels=3), nn.Dense(1)],
     r"layer '1' \(FullyConnected\): one output channel"),
])
def test_refuses(layers, msg):
    g = from_gluon(_seq(*layers()), (1, 3, 16, 16))
    with pytest.raises(tengine.TengineExportError, match=msg):
        tengine.lower_model(g, [X])


class _Custom(gluon.HybridBlock):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2D(4, 3, padding=1, in_channels=3)
        self.bn = nn.BatchNorm()

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        if self.kind == "fanout":
            return self.bn(y) + y
        return F.broadcast_mul(y, F.Activation(y, act_type="sigmoid"))


def test_unfoldable_batchnorm_becomes_a_depthwise_conv(tmp_path):
    """A BatchNorm that cannot be folded (its input has a second use, as in pre-activation nets) is written
    as a 1x1 depthwise conv with the BN's name: same fp32 values, and Tengine runs it in int8 like any conv."""
    from deployq.exporters.ir.mxnet_lower import run as mx_run
    from deployq.exporters.ir.passes import optimize
    from deployq.exporters.tengine.bn_conv import batchnorm_as_depthwise

    net = _Custom("fanout")
    net.initialize(mx.init.Xavier())
    net(mx.nd.array(X[:1]))
    for p in net.bn.params.values():  # random statistics and affine
        p.set_data(mx.nd.array(np.random.default_rng(1).uniform(0.5, 2.0, p.shape)))
    g = from_gluon(net, (1, 3, 16, 16))
    exp = tengine.lower_model(g, [X])
    dw = exp.graph.node("bn")
    assert dw.op == "Convolution" and dw.attrs["num_group"] == 4 and exp.graph.param(dw, "weight").shape == (4, 1, 1, 1)
    dwg = batchnorm_as_depthwise(optimize(g))  # before the weights go on Tengine's int8 grid
    assert [n.op for n in dwg.nodes].count("BatchNorm") == 0
    np.testing.assert_allclose(mx_run(dwg, X)[dwg.outputs[0]], net(mx.nd.array(X)).asnumpy(), rtol=1e-4, atol=1e-5)
    ref = TengineReference(*write(exp, tmp_path)[:3], input_shape=(1, 3, 16, 16))
    step = exp.scale_of(exp.tensor_map[exp.graph.outputs[0]]).step
    assert np.abs(simulate(exp, X) - ref(X)).max() <= step * (1 + 1e-4)


def test_equal_shape_broadcast_mul_is_elemwise_mul():
    """broadcast_mul of equal shapes -> elemwise_mul (Eltwise PROD, int8); other cases: test_tengine_shape_ops.py."""
    net = _Custom("mul")
    net.initialize()
    exp = tengine.lower_model(from_gluon(net, (1, 3, 16, 16)), [X])
    assert [n.op for n in exp.graph.nodes][-1] == "elemwise_mul"


def test_standalone_relu6_refused():
    net = _seq(nn.Conv2D(4, 3, in_channels=3), nn.GlobalAvgPool2D())
    g = from_gluon(net, (1, 3, 16, 16))
    g.nodes.append(tengine.Node("clip", "relu6", [g.outputs[0]], ["relu6"], {"a_min": 0.0, "a_max": 6.0}))
    g.outputs = ["relu6"]
    with pytest.raises(tengine.TengineExportError, match=r"layer 'relu6' \(clip\): ReLU6 not fused"):
        tengine.lower_model(g, [X])


def test_dead_channel():
    net = _seq(nn.Conv2D(4, 3, in_channels=3), nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Dense(3))
    g = from_gluon(net, (1, 3, 16, 16))
    w = g.params["0.weight"].copy()
    w[2] = 0
    g.params["0.weight"] = w
    g.params["0.bias"] = np.array([0, 0, 0.5, 0], np.float32)
    msg = r"layer '0' \(Convolution\): output channel\(s\) \[2\] have all-zero weights but a non-zero bias"
    with pytest.raises(tengine.TengineExportError, match=msg):
        tengine.lower_model(g, [X])
    g.params["0.bias"] = np.zeros(4, np.float32)
    with pytest.warns(UserWarning, match=r"layer '0' .*\[2\] have all-zero weights and bias"):
        exp = tengine.lower_model(g, [X])
    assert exp.weight_steps["0"][2] == 0


def test_params_named_state_or_label_are_renamed(tmp_path):
    """Tengine's converter drops inputs whose name contains 'state' or 'label'."""
    net = _seq(nn.Conv2D(4, 3, in_channels=3), nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Dense(3))
    g = from_gluon(net, (1, 3, 16, 16))
    conv = g.node("0")
    g.params["state_label.w"] = g.params.pop(conv.params["weight"])
    conv.params["weight"] = "state_label.w"
    exp = tengine.lower_model(g, [X])
    text = write(exp, tmp_path)[0].read_text()
    assert "state" not in text and "label" not in text and "stat_" in text


class _ConcatPool(gluon.HybridBlock):
    """Two branches of different ranges concatenated, then a max pooling (googlenet's inception blocks)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2D(4, 1, in_channels=3), nn.Conv2D(4, 1, in_channels=3)

    def hybrid_forward(self, F, x):
        y = F.Concat(self.a(x), self.b(x), dim=1)
        return F.Pooling(y, kernel=(2, 2), stride=(2, 2), pool_type="max")


def test_concat_scale_spreads_to_the_following_max_pooling():
    """quant_tool's inplace mode gives a max pooling's input its output scale: a concat whose scale was raised to
    cover its inputs must hand the same scale to the pooling, or Tengine runs the concat on the smaller one."""
    net = _ConcatPool()
    net.initialize(mx.init.Xavier())
    net(mx.nd.array(X[:1]))
    net.b.weight.set_data(net.b.weight.data() * 8)  # branch b has the wider range
    g = from_gluon(net, (1, 3, 16, 16))
    from deployq.exporters.ir.graph import TensorQuant

    cat_t = next(n for n in g.nodes if n.op == "Concat").output
    g.quant[cat_t] = TensorQuant(0.01, -0.01, 0.01, "scale-file")  # a (KL-like) threshold below the inputs'
    exp = tengine.lower_model(g, [X])
    cat = next(n for n in exp.graph.nodes if n.op == "Concat")
    pool = next(n for n in exp.graph.nodes if n.op == "Pooling")
    s = {r.tensor: r.step for r in exp.scales}
    assert s[cat.output] == s[pool.output] == max(s[exp.tensor_map[t]] for t in cat.inputs)
