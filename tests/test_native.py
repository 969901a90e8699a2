"""deployq.native: the fused operators compute what the MXNet-operator formulation computes.

Forward outputs and tracked ranges are bit-identical (the operators repeat the same float32/float64 operations);
fake-BN batch statistics are summed in float64 by the fused operator and in float32 by MXNet, so layers trained
with fake BN agree to float32 rounding. Gradients agree to rounding (MXNet computes g * s / s through the STE).
"""

from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import deployq
import deployq.native

from .test_core import small_net

pytestmark = pytest.mark.skipif(not deployq.native.available(), reason="no C++ compiler: fused operators off")

CASES = [
    ("ncnn", "qat", None, True),
    ("onnx", "qat", None, True),  # uint8 with a zero point, round half to even
    ("tengine", "naive", None, True),  # clipped values keep their gradient
    ("ncnn", "qat", [{"op_types": ["Conv2D", "Dense"], "fake_bn": False, "input_mode": "online"}], False),
    ("ncnn", "qat", [{"op_types": ["Conv2D", "Dense"], "fake_bn": False, "quant_start_step": 2,
                      "quant_bits": 4, "quant_scheme": "per_tensor_symmetric"}], False),
    ("ncnn", "observer", None, True),
    ("custom", "dorefa", [{"op_types": ["Conv2D", "Dense"], "fake_bn": False, "quant_dtype": {"input": "uint"}}],
     False),
    ("ncnn", "qat", [{"op_types": ["Conv2D", "Dense"], "quant_types": ["input", "weight", "output"],
                      "fake_bn": False}], False),
    ("ncnn", "qat", [{"op_types": ["Conv2D", "Dense"], "bn_freeze_step": 2}], True),
    ("ncnn", "qat", [{"op_types": ["Conv2D", "Dense"], "bn_freeze_step": 0}], True),
]


def _train_steps(net, rng, steps: int, loss_of):
    """``steps`` SGD steps of ``net`` (hybridized) on random 8x3x8x8 batches; returns the training outputs and
    the gradients of every trained parameter, per step."""
    net.hybridize(static_alloc=True)
    trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    outs, grads = [], []
    for _ in range(steps):
        x = mx.nd.array(rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
        with autograd.record():
            out = net(x)
            loss = loss_of(out)
        loss.backward()
        outs.append(out.asnumpy())
        grads.append({k: p.grad().asnumpy().copy() for k, p in net._collect_params_with_prefix().items()
                      if p.grad_req != "null" and not k.endswith("_anchor")})
        trainer.step(8)
    return outs, grads


def _train(profile, algorithm, config, native: bool, correction: bool = False):
    net = small_net(3)
    deployq.quantize(net, config, profile, algorithm)
    for b in deployq.quant_layers(net).values():
        b.fake_bn_correction = correction
    deployq.use_native(net, native)
    assert all(b._native() == native for b in deployq.quant_layers(net).values())
    rng = np.random.default_rng(0)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    outs, grads = _train_steps(net, rng, 4, lambda out: loss_fn(out, mx.nd.array(rng.integers(0, 10, 8))))
    x = mx.nd.array(rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    states = {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()
              if k.endswith(("input_state", "output_state"))}
    return outs, grads, states, net(x).asnumpy()


@pytest.mark.parametrize("profile,algorithm,config,fake_bn", CASES + [("ncnn", "qat", "correction", True)])
def test_fused_operators_match_mxnet_operators(profile, algorithm, config, fake_bn):
    correction = config == "correction"  # fake BN with batch statistics (Krishnamoorthi's correction)
    config = None if correction else config
    a_outs, a_grads, a_states, a_inf = _train(profile, algorithm, config, True, correction)
    b_outs, b_grads, b_states, b_inf = _train(profile, algorithm, config, False, correction)
    # the first training step starts from the same weights: its outputs are bit-identical without fake BN
    tol = 1e-5 if fake_bn else 0.0
    np.testing.assert_allclose(a_outs[0], b_outs[0], rtol=0, atol=tol)
    for k, g in b_grads[0].items():
        np.testing.assert_allclose(a_grads[0][k], g, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(g).max()), err_msg=k)
    assert a_states.keys() == b_states.keys() and a_states
    for k, st in b_states.items():
        np.testing.assert_allclose(a_states[k], st, rtol=1e-4, atol=1e-6, err_msg=k)
        assert a_states[k][3] == 4  # steps seen
    # after 4 steps: fake-BN statistics differ in float32 rounding, which can move a code (or an int32 bias code)
    np.testing.assert_allclose(a_inf, b_inf, rtol=1e-3, atol=(1e-2 if fake_bn else 1e-3) * np.abs(b_inf).max())


@pytest.mark.parametrize("profile", ["ncnn", "onnx", "tengine"])
def test_inference_is_bit_identical_on_the_same_state(profile):
    """Same weights and ranges: the fused and the MXNet-operator simulation give identical outputs."""
    net = small_net(5)
    deployq.quantize(net, profile=profile)
    x = mx.nd.random.normal(shape=(16, 3, 8, 8))
    with autograd.record():  # one training step to initialise ranges and fake-BN statistics
        net(x).backward()
    ys = []
    for native in (True, False, True):
        deployq.use_native(net, native)
        ys.append(net(x).asnumpy())
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_array_equal(ys[0], ys[2])


class _Residual(gluon.HybridBlock):
    """conv-BN-ReLU-conv-BN plus the input, then ReLU: a residual block whose output the onnx profile quantizes."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.body = gluon.nn.HybridSequential()
            self.body.add(gluon.nn.Conv2D(channels, 3, padding=1, use_bias=False), gluon.nn.BatchNorm(),
                          gluon.nn.Activation("relu"), gluon.nn.Conv2D(channels, 3, padding=1, use_bias=False),
                          gluon.nn.BatchNorm())

    def hybrid_forward(self, F, x):
        return F.Activation(x + self.body(x), act_type="relu")


def residual_net(seed=0):
    mx.random.seed(seed)
    net = gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(gluon.nn.Conv2D(8, 3, padding=1, use_bias=False), gluon.nn.BatchNorm(), _Residual(8), _Residual(8),
                gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net(mx.nd.random.normal(shape=(4, 3, 8, 8)))
    return net


def test_block_output_quantizer_fused_matches_mxnet_operators():
    """The onnx profile quantizes the residual blocks' outputs (deployq.api.block_output_points) and the layer
    outputs that feed them: training and inference agree between the fused and the MXNet-operator paths."""
    runs = []
    for native in (True, False):
        net = residual_net(3)
        deployq.quantize(net, profile="onnx")
        assert list(deployq.api.output_quantizers(net)) == ["2", "3"]
        deployq.use_native(net, native)
        net.hybridize(static_alloc=True)
        trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
        rng = np.random.default_rng(0)
        outs = []
        for _ in range(3):
            x = mx.nd.array(rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
            with autograd.record():
                out = net(x)
                loss = gluon.loss.SoftmaxCrossEntropyLoss()(out, mx.nd.array(rng.integers(0, 10, 8)))
            loss.backward()
            outs.append(out.asnumpy())
            trainer.step(8)
        states = {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()
                  if k.endswith("output_state")}
        runs.append((outs, states, net(x).asnumpy()))
    (a_outs, a_states, a_inf), (b_outs, b_states, b_inf) = runs
    np.testing.assert_allclose(a_outs[0], b_outs[0], rtol=0, atol=1e-5)
    assert a_states.keys() == b_states.keys()
    assert {"0.output_state", "2.body.3.output_state", "2.dq_output.output_state"} <= set(a_states)
    for k, st in b_states.items():
        np.testing.assert_allclose(a_states[k], st, rtol=1e-4, atol=1e-6, err_msg=k)
        assert a_states[k][2] == 1 and a_states[k][3] == 3
    np.testing.assert_allclose(a_inf, b_inf, rtol=1e-3, atol=1e-2 * np.abs(b_inf).max())


@pytest.mark.parametrize("convention", ["step", "multiplier"])
@pytest.mark.parametrize("rounding", ["half_away_from_zero", "half_to_even"])
def test_ties_and_clipping_match_mxnet_fake_quantize(convention, rounding):
    """Exact grid ties (k + 1/2 steps), values far outside the range and zeros: the fused operator's
    vectorized rounding gives what deployq.fakequant.fake_quantize (MXNet's round) gives, and its gradient
    mask is the clip mask."""
    from deployq.fakequant import fake_quantize

    t = 2.54
    x = np.concatenate([(np.arange(-140, 140) + 0.5) * (t / 127), [0.0, -0.0, 1e6, -1e6, 3e9, -3e9],
                        np.random.default_rng(0).normal(0, 2, 4000)]).astype(np.float32)
    xs = mx.nd.array(x)
    xs.attach_grad()
    state = mx.nd.array([-t, t, 1, 5], dtype="float64")
    with autograd.record():
        y, _ = mx.nd.dq_act_quant(xs, state, mx.nd.zeros(1), quant=1, qmin=-127, qmax=127, rounding=rounding,
                                  convention=convention)
    y.backward()
    scale = np.float32(t) / 127 if convention == "step" else np.float32(127) / np.float32(t)
    ref = fake_quantize(mx.nd, mx.nd.array(x), mx.nd.array([scale]), -127, 127, None, rounding, convention)
    np.testing.assert_array_equal(y.asnumpy(), ref.asnumpy())
    inside = np.abs(x) <= t * (1 + 0.5 / 127)
    np.testing.assert_array_equal(xs.grad.asnumpy()[np.abs(np.abs(x) - t * (1 + 0.5 / 127)) > 1e-4],
                                  inside[np.abs(np.abs(x) - t * (1 + 0.5 / 127)) > 1e-4].astype(np.float32))


@pytest.mark.parametrize("native", [True, False])
def test_fake_bn_correction_trains_like_batchnorm(native):
    """With the correction, a fake-BN layer in training computes BatchNorm with the batch's statistics: an
    observer (fp32 in training) gives the fp32 net's training-mode output; without it, the running ones."""
    x = mx.nd.random.normal(shape=(16, 3, 8, 8))
    ref_net = small_net(7)
    with autograd.record():
        ref = ref_net(x).asnumpy()  # BatchNorm with batch statistics
    outs = {}
    for correction in (True, False):
        net = small_net(7)
        deployq.quantize(net, profile="ncnn", algorithm="observer")
        deployq.use_native(net, native)
        for b in deployq.quant_layers(net).values():
            b.fake_bn_correction = correction
        with autograd.record():
            outs[correction] = net(x).asnumpy()
    np.testing.assert_allclose(outs[True], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.abs(outs[False] - ref).max() > 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("freeze", [None, 0, 2])
def test_bn_freeze_step(native, freeze):
    """Fake-BN running statistics follow the batch statistics for ``bn_freeze_step`` training steps, then stay
    bit-identical; with 0 they keep the fp32 BatchNorm's statistics and the statistics conv is not built."""
    net = small_net(3)
    bn_stats = {k: p.data().asnumpy().copy() for k, p in net._collect_params_with_prefix().items()
                if k.endswith("running_mean")}
    deployq.quantize(net, [{"op_types": ["Conv2D", "Dense"], "bn_freeze_step": freeze}], "ncnn", "qat")
    deployq.use_native(net, native)
    convs = sum(n["op"] == "Convolution" for n in json.loads(net(mx.sym.var("data")).tojson())["nodes"])
    n_conv = sum(isinstance(b, gluon.nn.Conv2D) for b in deployq.quant_layers(net).values())
    n_bn = sum(b._dq_bn_kwargs is not None for b in deployq.quant_layers(net).values())
    assert n_bn > 0
    assert convs == n_conv + (0 if freeze == 0 else n_bn)  # one statistics conv per fake-BN layer
    net.hybridize(static_alloc=True)
    trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05})
    rng = np.random.default_rng(0)
    fake = [b for b in deployq.quant_layers(net).values() if b._dq_bn_kwargs is not None]
    hist = [[b.fakebn_mean.data().asnumpy().copy() for b in fake]]
    for _ in range(4):
        x = mx.nd.array(rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        trainer.step(8)
        hist.append([b.fakebn_mean.data().asnumpy().copy() for b in fake])
    limit = 4 if freeze is None else freeze
    for step in range(4):
        for before, after in zip(hist[step], hist[step + 1], strict=True):
            if step < limit:
                assert np.abs(after - before).max() > 1e-6, step
            else:
                np.testing.assert_array_equal(after, before)
    if freeze == 0:
        for b in fake:
            ref = [v for k, v in bn_stats.items() if k.startswith(b.bn_path + ".")][0]
            np.testing.assert_array_equal(b.fakebn_mean.data().asnumpy(), ref.astype(np.float64))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("profile", ["ncnn", "onnx"])
def test_fused_relu_is_exact(monkeypatch, native, profile):
    """A ReLU block read only by quantized layers is applied by their input quantizers (the block bypassed):
    outputs, gradients and tracked ranges are bit-identical to the net that runs the ReLU block."""
    import deployq.api

    def train(fuse: bool):
        if not fuse:
            monkeypatch.setattr(deployq.api, "input_relus", lambda net, cfgs: {})
        net = small_net(4)
        deployq.quantize(net, profile=profile)
        monkeypatch.undo()
        fused = [b.layer_config.input_relu for b in deployq.quant_layers(net).values()]
        assert any(fused) == fuse
        bypassed = [b for b in net._children.values() if isinstance(b, deployq.blocks.BypassActivation)]
        assert len(bypassed) == (2 if fuse else 0)  # the ReLU before the pooling is not read by a layer
        deployq.use_native(net, native)
        rng = np.random.default_rng(1)
        outs, grads = _train_steps(net, rng, 3, lambda out: (out * out).sum())
        x = mx.nd.array(rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
        with deployq.float_mode(net):
            fp32 = net(x).asnumpy()
        states = {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()
                  if k.endswith("_state")}
        return outs, grads, states, net(x).asnumpy(), fp32

    a, b = train(True), train(False)
    for u, v in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(u, v)
    for ga, gb in zip(a[1], b[1], strict=True):
        assert ga.keys() == gb.keys()
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k], err_msg=k)
    for k in b[2]:
        np.testing.assert_array_equal(a[2][k], b[2][k], err_msg=k)
    np.testing.assert_array_equal(a[3], b[3])
    np.testing.assert_array_equal(a[4], b[4])  # float_mode runs the ReLU blocks again
