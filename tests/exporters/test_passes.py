"""Each pass keeps the fp32 outputs (<= 1e-5 relative) and changes the graph as documented."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.annotate import annotate, graph_fingerprint
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.ir.graph import GraphError
from deployq.exporters.ir.mxnet_lower import run
from deployq.exporters.ir.passes import drop_dropout, fold_batchnorm, mark_fusable_activations, optimize
from mxnet import gluon

from .conftest import MODELS, random_net, rel_err

X = np.random.default_rng(3).normal(size=(8, 3, 32, 32)).astype(np.float32)


def _same(g0, g1, x=X):
    return rel_err(run(g1, x)[g1.outputs[0]], run(g0, x)[g0.outputs[0]])


@pytest.mark.parametrize("name", MODELS)
def test_fold_batchnorm_random(name):
    g = from_gluon(random_net(name))
    f = fold_batchnorm(g)
    assert not [n for n in f.nodes if n.op == "BatchNorm"]
    assert sum(n.op == "BatchNorm" for n in g.nodes) > 0  # the input graph is untouched
    assert _same(g, f) <= 1e-5
    conv = f.node("features.0")
    assert conv.attrs["folded_bn"] == "features.1" and f.resolve("features.1") == "features.0"
    assert "features.1.gamma" not in f.params and f.param(conv, "bias").shape == (conv.attrs["num_filter"],)


def test_passes_trained(trained, test_images):
    _, net = trained
    g = from_gluon(net)
    assert _same(g, optimize(g), test_images[:200]) <= 1e-5


class _FanOut(gluon.HybridBlock):
    """conv -> (BN -> relu) + conv output: the BN must stay (pre-activation shortcut pattern)."""

    def __init__(self, fix_gamma: bool = False):
        super().__init__()
        self.conv = gluon.nn.Conv2D(4, 3, padding=1, in_channels=3)
        self.bn = gluon.nn.BatchNorm(scale=not fix_gamma, epsilon=0.1)
        self.conv2 = gluon.nn.Conv2D(4, 1, in_channels=4, use_bias=False)
        self.bn2 = gluon.nn.BatchNorm(scale=not fix_gamma, epsilon=0.1)
        self.drop = gluon.nn.Dropout(0.5)
        self.dense = gluon.nn.Dense(3)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        z = F.Activation(self.bn(y), act_type="relu") + y
        return self.dense(self.drop(F.clip(self.bn2(self.conv2(z)), 0, 6)))


def _fanout_net(fix_gamma=False):
    net = _FanOut(fix_gamma)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    rng = np.random.default_rng(0)
    for p in net.collect_params().values():
        if p.name.endswith(("gamma", "running_var")):
            p.set_data(mx.nd.array(rng.uniform(0.5, 2.0, p.shape)))
        elif p.name.endswith(("beta", "running_mean")):
            p.set_data(mx.nd.array(rng.normal(0, 0.5, p.shape)))
    return net


@pytest.mark.parametrize("fix_gamma", [False, True])
def test_fan_out_keeps_bn_and_eps(fix_gamma):
    g = from_gluon(_fanout_net(fix_gamma))
    f = fold_batchnorm(g)
    assert [n.name for n in f.nodes if n.op == "BatchNorm"] == ["bn"]  # fan-out BN stays, bn2 is folded
    assert g.node("bn2").attrs["eps"] == pytest.approx(0.1)
    assert g.node("bn2").attrs["fix_gamma"] is fix_gamma
    assert _same(g, f) <= 1e-5


def test_drop_dropout():
    g = from_gluon(_fanout_net())
    d = drop_dropout(g)
    assert [n.op for n in g.nodes].count("Dropout") == 1 and "Dropout" not in [n.op for n in d.nodes]
    assert d.node("dense").inputs == [g.node("drop").inputs[0]]
    assert _same(g, d) <= 1e-5


def test_mark_fusable_activations():
    g = fold_batchnorm(from_gluon(_fanout_net()))
    m = mark_fusable_activations(g)
    assert m.node("conv2").attrs["fusable_activation"] == "relu6"  # clip(0, 6) after the folded BN
    assert "fusable_activation" not in m.node("conv").attrs  # conv output fans out
    assert len(m.nodes) == len(g.nodes)
    assert _same(g, m) <= 1e-5
    r = mark_fusable_activations(fold_batchnorm(from_gluon(random_net("mobilenet0.25"))))
    acts = [n for n in r.nodes if n.op == "Activation"]
    assert acts and all(r.node(a.attrs["fusable_into"]).attrs["fusable_activation"] == "relu" for a in acts)


def test_annotate_resolves_aliases_and_checks_model():
    g = fold_batchnorm(from_gluon(random_net("mobilenet0.25"), name="mobilenet0.25"))
    scales = {"schema": "deployq.scales", "version": 1,
              "model": {"name": "mobilenet0.25", "fingerprint": graph_fingerprint(g)},
              "tensors": {"features.0:input": {"tensor": "data", "threshold": 2.5, "lo": -0.4, "hi": 2.5},
                          "features.3:input": {"threshold": 1.5},
                          "features.1": {"threshold": 4.0}}}
    a = annotate(g, scales)
    assert a.quant["data"].threshold == 2.5 and a.quant["data"].step() == pytest.approx(2.5 / 127)
    assert a.quant["features.0"].threshold == 4.0  # BN output folded into the conv
    assert a.quant[g.node("features.3").inputs[0]].threshold == 1.5
    assert not g.quant
    bad = dict(scales, model={"name": "resnet20", "fingerprint": "sha256:0000"})
    with pytest.raises(GraphError, match="scale file is for model 'resnet20'"):
        annotate(g, bad)
    with pytest.raises(GraphError, match="does not have: nope"):
        annotate(g, dict(scales, tensors={"nope": {"threshold": 1.0}}))


@pytest.mark.parametrize("name", MODELS)
def test_fingerprint_matches_core(name):
    """Scale files written by the core (deployq.fingerprint of the Gluon net) must match the IR's."""
    import deployq

    net = random_net(name)
    g = from_gluon(net)
    assert graph_fingerprint(g) == deployq.fingerprint(net) == graph_fingerprint(optimize(g))


def test_annotate_bad_entry():
    g = from_gluon(random_net("mobilenet0.25"))
    bad = {"schema": "deployq.scales", "version": 1, "tensors": {"data": {"lo": 0.0}}}
    with pytest.raises(GraphError, match="entry 'data' has no numeric 'threshold'"):
        annotate(g, bad, where="s.json")
    with pytest.raises(GraphError, match="unknown scale-file schema"):
        annotate(g, {"schema": "other", "tensors": {}})
