"""deployq.quantizers: the registry, each built-in algorithm's math against a NumPy model of what its docstring
states, and a user-defined quantizer (PACT-like learned clip) that trains on sklearn digits and exports to ONNX,
where onnxruntime gives the simulation's outputs."""

from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from deployq.exporters.onnx.export import export_qnet
from mxnet import autograd, gluon
from mxnet.gluon import nn

import deployq
from deployq.data import batches, load_digits
from deployq.fakequant import np_round_half_away
from deployq.layerwise import output_step, run_layers
from deployq.quantizers import (
    BUILTIN,
    QUANTIZERS,
    QATQuantizer,
    Quantizer,
    get_quantizer,
    register_quantizer,
    with_gradient,
)

from .test_core import small_net

NO_FAKE_BN = [{"op_types": ["Conv2D", "Dense"], "fake_bn": False}]


@pytest.fixture
def registry():
    """Names registered by a test are removed afterwards."""
    before = dict(QUANTIZERS)
    yield
    QUANTIZERS.clear()
    QUANTIZERS.update(before)


# ------------------------------------------------------------------ registry

def test_unknown_name_lists_the_registered_ones(registry):
    register_quantizer("mine", type("Mine", (Quantizer,), {}))
    for call in (lambda: get_quantizer("adaround"), lambda: deployq.quantize(small_net(), algorithm="adaround")):
        with pytest.raises(ValueError, match="unknown algorithm 'adaround'") as e:
            call()
        assert all(name in str(e.value) for name in ("naive", "qat", "dorefa", "lsq", "bnn", "observer", "mine"))


def test_register_rules(registry):
    with pytest.raises(ValueError, match="built in"):
        register_quantizer("qat", type("Other", (Quantizer,), {}))
    with pytest.raises(TypeError, match="not a subclass"):
        register_quantizer("plain", object)

    @register_quantizer("deco")
    class Deco(QATQuantizer):
        pass

    assert get_quantizer("deco") is Deco and Deco.name == "deco"
    assert Deco.forward_paths() == ("native", "mxnet")  # nothing overridden: the fused operators still apply


def test_cli_choices_are_the_builtins():
    from deployq.commands import _ALGORITHMS  # kept light (no mxnet import) for the CLI's start-up

    assert _ALGORITHMS == BUILTIN


def test_forward_paths():
    assert {n: get_quantizer(n).forward_paths() for n in ("naive", "qat", "dorefa", "observer", "lsq", "bnn")} == {
        "naive": ("native", "mxnet"), "qat": ("native", "mxnet"), "dorefa": ("native", "mxnet"),
        "observer": ("native", "mxnet"), "lsq": ("mxnet",), "bnn": ("mxnet",)}

    class Custom(QATQuantizer):
        def quantize_input(self, F, x, lo, hi, params):
            return x

    assert Custom.forward_paths() == ("mxnet",)  # the fused operators would compute QAT's input instead


# ------------------------------------------------------------------ built-ins against NumPy

def _layer(profile: str, algorithm: str):
    """The first conv (8 output channels, 3 input channels, 3x3) of a quantized small net and its parameters."""
    net = small_net(1)
    deployq.quantize(net, NO_FAKE_BN, profile, algorithm)
    layer = deployq.quant_layers(net)["0"]
    return layer, {k: v.data() for k, v in layer._reg_params.items()}


def _np_maxabs(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(ŵ, step): symmetric per-output-channel max-abs, ncnn's multiplier convention (float32, C round())."""
    amax = np.abs(w).reshape(w.shape[0], -1).max(1).astype(np.float32).reshape(-1, 1, 1, 1)
    scale = np.float32(qmax) / amax
    codes = np.clip(np_round_half_away(w * scale), -qmax, qmax)
    return (codes / scale).astype(np.float32), (amax / qmax).reshape(-1)


RNG = np.random.default_rng(7)
X = (RNG.standard_normal((2, 3, 5, 5)) * 1.5).astype(np.float32)
LO, HI = np.float32(-1.2), np.float32(2.0)


def _activation(q: Quantizer, x: np.ndarray, params, output: bool = False):
    """(x̂, dx̂/dx) of the quantizer's input (or output) quantization at the range (LO, HI)."""
    xn = mx.nd.array(x)
    xn.attach_grad()
    lo, hi = mx.nd.array([LO]), mx.nd.array([HI])
    with autograd.record():
        y = (q.quantize_output if output else q.quantize_input)(mx.nd, xn, lo, hi, params)
    y.backward()
    return y.asnumpy(), xn.grad.asnumpy()


@pytest.mark.parametrize("algorithm", ["naive", "qat", "observer"])
def test_max_abs_algorithms(algorithm):
    layer, p = _layer("ncnn", algorithm)
    q = layer.quantizer
    w = p["weight"].asnumpy()
    ref, step = _np_maxabs(w)
    np.testing.assert_array_equal(q.quantize_weight(mx.nd, p["weight"], p).asnumpy(), ref)
    np.testing.assert_allclose(q.weight_step(p["weight"], p), step, rtol=1e-7)
    # inputs: threshold max(|lo|, |hi|) = 2, multiplier 127/2, C round(), clipped to [-127, 127]
    y, g = _activation(q, X, p)
    scale = np.float32(127) / HI
    np.testing.assert_array_equal(y, np.clip(np_round_half_away(X * scale), -127, 127) / scale)
    inside = np.abs(np_round_half_away(X * scale)) <= 127
    # qat (and observer) give clipped codes no gradient; naive passes it straight through
    np.testing.assert_array_equal(g, np.ones_like(X) if algorithm == "naive" else inside.astype(np.float32))
    assert not inside.all()
    # the tracked range: moving average (momentum m), or the running min/max of an observer
    lo, hi, blo, bhi = (mx.nd.array([v], dtype="float64") for v in (-1.0, 2.0, -3.0, 1.0))
    new = [float(v.asscalar()) for v in q.update_range(mx.nd, lo, hi, blo, bhi, 0.9)]
    assert new == pytest.approx([-3.0, 2.0] if algorithm == "observer" else [-0.9 - 0.3, 1.8 + 0.1], rel=1e-12)


def test_affine_activation_onnx():
    """onnx profile: uint8 with a zero point, round half to even, step (hi - lo) / 255."""
    layer, p = _layer("onnx", "qat")
    y, _ = _activation(layer.quantizer, X, p)
    step = (HI - LO) / np.float32(255)
    zp = np.clip(np_round_half_away(0 - LO / step), 0, 255)
    codes = np.clip(np.rint(X / step) + zp, 0, 255)
    np.testing.assert_allclose(y, (codes - zp) * step, rtol=0, atol=1e-6)


def test_dorefa_weights():
    layer, p = _layer("ncnn", "dorefa")
    w = p["weight"].asnumpy()
    t = np.tanh(w)
    u = t / np.abs(t).reshape(8, -1).max(1).reshape(-1, 1, 1, 1)
    amax = np.abs(w).reshape(8, -1).max(1).reshape(-1, 1, 1, 1)
    ref = np_round_half_away(u * 127) / 127 * amax
    got = layer.quantizer.quantize_weight(mx.nd, p["weight"], p).asnumpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    # on the max-abs grid: integer codes in [-127, 127]
    codes = got / (amax / 127)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)


def test_lsq_steps():
    layer, p = _layer("ncnn", "lsq")
    q = layer.quantizer
    w = p["weight"].asnumpy()
    s = p["weight_lsq_step"].asnumpy()
    np.testing.assert_allclose(s, 2 * np.abs(w).reshape(8, -1).mean(1) / math.sqrt(127), rtol=1e-6)
    ref = np.clip(np_round_half_away(w / s.reshape(-1, 1, 1, 1)), -127, 127) * s.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(q.quantize_weight(mx.nd, p["weight"], p).asnumpy(), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(q.weight_step(p["weight"], p), s)
    # the input step: a learned step (here 0.02) in place of the tracked threshold / 127
    p["input_lsq_step"][:] = 0.02
    y, _ = _activation(q, X, p)
    np.testing.assert_allclose(y, np.clip(np_round_half_away(X / np.float32(0.02)), -127, 127) * np.float32(0.02),
                               rtol=1e-6, atol=1e-7)
    layer.input_lsq_step.set_data(mx.nd.array([0.02]))
    assert layer.input_range() == pytest.approx((-0.02 * 127, 0.02 * 127))


def test_bnn_signs():
    layer, p = _layer("ncnn", "bnn")
    q = layer.quantizer
    w = p["weight"].asnumpy()
    amax = np.abs(w).reshape(8, -1).max(1).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(q.quantize_weight(mx.nd, p["weight"], p).asnumpy(), np.where(w >= 0, 1, -1) * amax,
                               rtol=1e-6)
    for output in (False, True):
        y, g = _activation(q, X, p, output)
        np.testing.assert_array_equal(y, np.where(X >= 0, 1, -1))
        np.testing.assert_array_equal(g, (np.abs(X) <= 1).astype(np.float32))  # gradient of clip(x, -1, 1)
    assert not q.int32_bias and not q.block_outputs


# ------------------------------------------------------------------ a user-defined quantizer

class PACT(Quantizer):
    """Inputs clipped to ``[max(lo, -alpha), min(hi, alpha)]`` with a learned ``alpha`` (PACT, Choi et al. 2018),
    PACT's gradient (into alpha where the clip applies); weights as qat."""

    ALPHA = 1.5

    def create_params(self) -> None:
        if self.config.input is not None:
            self.add_param("pact_alpha", np.array([self.ALPHA], np.float32))

    def input_quant_range(self, F, lo, hi, params):
        a = params["pact_alpha"]
        return F.maximum(lo, -a), F.minimum(hi, a)

    def quantize_input(self, F, x, lo, hi, params):
        value = self.quantize_activation(F, x, self.config.input, lo, hi)
        surrogate = x - F.relu(F.broadcast_sub(x, hi)) + F.relu(F.broadcast_sub(lo, x))  # d/dhi: 1 above hi
        return with_gradient(F, value, surrogate)


def _digits_net() -> nn.HybridSequential:
    mx.random.seed(0)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv2D(16, 3, strides=2, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Dense(10))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 1, 8, 8)))
    return net


@pytest.mark.slow
def test_user_quantizer_trains_and_exports_to_onnx(registry, tmp_path):
    register_quantizer("pact", PACT)
    net = deployq.quantize(_digits_net(), profile="onnx", algorithm="pact")  # fake BN, int32 bias, uint8 inputs
    layers = deployq.quant_layers(net)
    assert all(isinstance(b.quantizer, PACT) and not b._native() for b in layers.values())
    net.hybridize()
    data = load_digits("train")
    trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.05, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    losses = []
    for ep in range(2):
        for xb, yb in batches(data.x, data.y, 64, shuffle=True, seed=ep):
            with autograd.record():
                loss = loss_fn(net(mx.nd.array(xb)), mx.nd.array(yb))
            loss.backward()
            trainer.step(len(xb))
            losses.append(float(loss.mean().asscalar()))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses  # measured 2.30 -> 0.15
    alphas = {p: float(b.pact_alpha.data().asscalar()) for p, b in layers.items()}
    assert any(abs(a - PACT.ALPHA) > 0.05 for a in alphas.values()), alphas  # alpha learned where it clipped
    # the exported input ranges are PACT's clip of the tracked ranges
    for path, b in layers.items():
        st = b.input_state.data().asnumpy().astype(np.float32)
        assert b.input_range() == pytest.approx((max(st[0], -alphas[path]), min(st[1], alphas[path])), rel=1e-6)

    test = load_digits("test")
    sim, _ = run_layers(net, test.x)
    assert (sim.argmax(1) == test.y).mean() > 0.7  # measured 0.90
    files = export_qnet(net, tmp_path, "digits", input_shape=(1, 1, 8, 8))
    model = onnx.load(str(files["model"]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    lo, hi = layers["0"].input_range()
    assert float(inits["data.q.step"]) == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-6)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(str(files["model"]), so, providers=["CPUExecutionProvider"]).run(
        None, {"data": test.x})[0]
    assert (y.argmax(1) == sim.argmax(1)).mean() == 1.0
    assert np.abs(y - sim).max() <= output_step(net)  # measured 0 output steps
