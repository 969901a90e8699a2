"""The quantization core: config matching, per-group weights, EMA ranges, fake BN, contexts, export, save/load."""

import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

import deployq
import deployq.native
from deployq.fakequant import np_round_half_away


def small_net(seed=0, depthwise=True):
    mx.random.seed(seed)
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(nn.Conv2D(8, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"))
        if depthwise:
            net.add(nn.Conv2D(8, 3, padding=1, groups=8, use_bias=False), nn.BatchNorm(), nn.Activation("relu"))
        net.add(nn.Conv2D(16, 1), nn.Activation("relu"), nn.GlobalAvgPool2D(), nn.Flatten(), nn.Dense(10))
    net.initialize(mx.init.Xavier())
    x = mx.nd.random.normal(shape=(4, 3, 8, 8))
    net(x)
    # give the BatchNorms non-trivial statistics
    for b in net._children.values():
        if isinstance(b, nn.BatchNorm):
            c = b.gamma.shape[0]
            b.gamma.set_data(mx.nd.random.uniform(0.5, 2, shape=c))
            b.beta.set_data(mx.nd.random.normal(shape=c))
            b.running_mean.set_data(mx.nd.random.normal(shape=c))
            b.running_var.set_data(mx.nd.random.uniform(0.2, 3, shape=c))
    return net


# ------------------------------------------------------------------ config list

def test_config_last_match_wins_whole_and_exclude():
    net = small_net()
    cfg = [
        {"op_types": ["Conv2D", "Dense"], "quant_types": ["weight", "input"], "quant_bits": 8},
        {"op_names": ["3"], "quant_types": ["weight"], "quant_bits": {"weight": 4}},
        {"op_names_re": [r"1\d"], "exclude": True},
    ]
    deployq.quantize(net, cfg, profile="ncnn")
    layers = deployq.quant_layers(net)
    assert list(layers) == ["0", "3", "6"]  # Dense "10" excluded by the regex entry
    c3 = layers["3"].layer_config
    assert c3.entry == 1 and c3.weight.bits == 4 and c3.input is None  # whole dict, no merge with entry 0
    assert c3.weight.granularity == "group"  # ncnn: depthwise weights per group
    assert layers["0"].layer_config.weight.granularity == "channel"
    text = deployq.describe(net)
    assert "excluded" in text and "int4 group" in text


@pytest.mark.parametrize("bad, msg", [
    ([{"op_types": ["Conv2D"], "quant_bitz": 8}], "unknown key"),
    ([{"quant_bits": 9}], "quant_bits"),
    ([{"quant_bits": {"weight": 1}}], "quant_bits"),
    ([{"op_names": ["features.99"]}], "matches no Conv2D/Dense layer"),
    ([{"op_names_re": ["nothing.*"]}], "matches no Conv2D/Dense layer"),
    ([{"quant_dtype": {"input": "uint"}}], "signed symmetric int8"),
    ([{"op_types": ["LSTM"]}], "not supported"),
    ([{"bn_freeze_step": -1}], "bn_freeze_step must be a non-negative integer"),
    ([{"bn_freeze_step": 1.5}], "bn_freeze_step must be a non-negative integer"),
])
def test_config_errors(bad, msg):
    with pytest.raises(deployq.ConfigError, match=msg):
        deployq.quantize(small_net(), bad, profile="ncnn")


def test_unknown_profile_and_algorithm():
    with pytest.raises(ValueError, match="available profiles"):
        deployq.quantize(small_net(), profile="tflite")
    with pytest.raises(ValueError, match="supported"):
        deployq.quantize(small_net(), algorithm="adaround")


def test_structural_names_are_stable_across_get_model_calls():
    from deployq.zoo import get_model

    names = []
    for _ in range(2):
        net = get_model("resnet20")
        net.initialize()
        net(mx.nd.zeros((1, 3, 32, 32)))
        deployq.quantize(net, [{"op_names": ["features.0"], "quant_types": ["weight"]}])
        names.append(list(deployq.quant_layers(net)))
    assert names[0] == names[1] == ["features.0"]


# ------------------------------------------------------------------ weights

def test_per_group_equals_per_channel_on_depthwise():
    x = mx.nd.random.normal(shape=(2, 3, 8, 8))
    outs = []
    for scheme in ("per_group_symmetric", "per_channel_symmetric"):
        net = small_net(1)
        deployq.quantize(net, [{"op_types": ["Conv2D"], "quant_scheme": {"weight": scheme}}], profile="custom")
        outs.append(net(x).asnumpy())
        wq, step = deployq.quant_layers(net)["3"].quantized_weight()
        codes = wq / step.reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.all(np.abs(np.round(codes)).reshape(8, -1).max(1) == 127)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_weight_codes_match_numpy_reference_on_folded_weights():
    net = small_net(2)
    deployq.quantize(net, profile="ncnn")
    blk = deployq.quant_layers(net)["0"]
    wf, _ = blk.folded_weight_bias()
    wq, step = blk.quantized_weight()
    mult = np.float32(127) / np.abs(wf).reshape(8, -1).max(1)  # ncnn: 127/max|w| per output channel
    ref = np.clip(np_round_half_away(wf * mult.reshape(-1, 1, 1, 1)), -127, 127)
    np.testing.assert_array_equal(np.round(wq * mult.reshape(-1, 1, 1, 1)), ref)


# ------------------------------------------------------------------ fake BN

def test_fake_bn_folded_conv_equals_conv_bn_in_inference():
    net = small_net(3)
    x = mx.nd.random.normal(shape=(4, 3, 8, 8))
    ref = net(x).asnumpy()
    # quant_start_step far away: the layer runs folded but unquantized
    deployq.quantize(net, [{"op_types": ["Conv2D", "Dense"], "quant_start_step": 10 ** 6}], profile="ncnn")
    assert deployq.quant_layers(net)["0"].bn_path == "1"
    net.hybridize()
    np.testing.assert_allclose(net(x).asnumpy(), ref, rtol=1e-5, atol=1e-5)


def test_fake_bn_pairs_by_topology_not_names():
    class Weird(gluon.HybridBlock):
        def __init__(self):
            super().__init__(prefix="zz_")
            with self.name_scope():
                self.batchnorm_conv = nn.Conv2D(4, 3, padding=1, use_bias=False, prefix="batchnorm0_")
                self.conv_bn = nn.BatchNorm(prefix="conv0_")
                self.side = nn.Conv2D(4, 1, prefix="conv1_")
                self.side_bn = nn.BatchNorm(prefix="batchnorm1_")

        def hybrid_forward(self, F, x):
            y = self.conv_bn(self.batchnorm_conv(x))
            s = self.side(x)
            return self.side_bn(s) + s + y  # fan-out: this BN must not be folded

    net = Weird()
    net.initialize()
    net(mx.nd.zeros((1, 3, 6, 6)))
    deployq.quantize(net, profile="ncnn")
    q = deployq.quant_layers(net)
    assert q["batchnorm_conv"].bn_path == "conv_bn"
    assert q["side"].bn_path is None


def test_fake_bn_training_updates_running_stats_from_raw_conv():
    net = small_net(4, depthwise=False)
    deployq.quantize(net, profile="ncnn")
    blk = deployq.quant_layers(net)["0"]
    bn = net._children["1"]
    x = mx.nd.random.normal(shape=(16, 3, 8, 8))
    raw = mx.nd.Convolution(x, blk.weight.data(), None, no_bias=True, kernel=(3, 3), pad=(1, 1), num_filter=8)
    xq = x  # input quantization changes values slightly; compare with a tolerance on the statistics
    mean = raw.asnumpy().mean(axis=(0, 2, 3))
    rm0 = bn.running_mean.data().asnumpy()
    with autograd.record():
        out = net(xq)
    out.backward()
    expect = 0.9 * rm0 + 0.1 * mean
    np.testing.assert_allclose(blk.fakebn_mean.data().asnumpy(), expect, rtol=0.02, atol=0.02)
    with deployq.float_mode(net):  # the BatchNorm block gets the trained statistics for the fp32 graph
        np.testing.assert_allclose(bn.running_mean.data().asnumpy(), expect, rtol=0.02, atol=0.02)


# ------------------------------------------------------------------ ranges

def test_ema_initialised_from_first_batch_then_moving_average():
    net = small_net(5)
    deployq.quantize(net, profile="ncnn", ema_momentum=0.8)
    net.hybridize()
    blk = deployq.quant_layers(net)["0"]
    rng = np.random.default_rng(0)
    lo = hi = None
    for i in range(4):
        x = rng.normal(size=(4, 3, 8, 8)).astype(np.float32) * (i + 1)
        with autograd.record():
            y = net(mx.nd.array(x))
        y.backward()
        lo = x.min() if lo is None else 0.8 * lo + 0.2 * x.min()
        hi = x.max() if hi is None else 0.8 * hi + 0.2 * x.max()
    st = blk.input_state.data().asnumpy()
    np.testing.assert_allclose(st[:2], [lo, hi], rtol=1e-5)
    assert st[2] == 1 and st[3] == 4
    # inference leaves the range alone
    net(mx.nd.array(rng.normal(size=(4, 3, 8, 8)) * 100))
    np.testing.assert_array_equal(blk.input_state.data().asnumpy(), st)


def test_quant_start_step_passes_through_until_reached():
    x = mx.nd.random.normal(shape=(4, 3, 8, 8))
    net = small_net(6)
    deployq.quantize(net, [{"op_types": ["Conv2D", "Dense"], "quant_start_step": 2}], profile="ncnn")
    trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.0})
    diffs = []
    for _ in range(3):
        y = net(x).asnumpy()
        with deployq.float_mode(net):
            ref = net(x).asnumpy()
        diffs.append(np.abs(y - ref).max())
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        trainer.step(4)
    assert diffs[0] < 1e-5 and diffs[1] < 1e-5  # steps 0 and 1: fp32 (BN folded) only
    assert diffs[2] > 1e-4  # quantization active from step 2


def test_two_contexts_keep_identical_ranges():
    ctxs = [mx.cpu(0), mx.cpu(1)]
    net = small_net(7)
    params = net.collect_params()
    params.reset_ctx(ctxs)
    deployq.quantize(net, profile="ncnn")
    net.hybridize()
    trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
    rng = np.random.default_rng(1)
    lo = hi = None
    for i in range(3):
        x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32) * (1 + i)
        parts = gluon.utils.split_and_load(mx.nd.array(x), ctxs)
        with autograd.record():
            losses = [net(p).sum() for p in parts]
        for loss in losses:
            loss.backward()
        trainer.step(8)
        lo = x.min() if lo is None else 0.9 * lo + 0.1 * x.min()
        hi = x.max() if hi is None else 0.9 * hi + 0.1 * x.max()
    blk = deployq.quant_layers(net)["0"]
    a, b = (d.asnumpy() for d in blk.input_state.list_data())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[:2], [lo, hi], rtol=1e-5)  # equals the whole batch's moving average


# ------------------------------------------------------------------ export, save/load

def test_hybridize_and_export_quantized_net(tmp_path):
    net = small_net(8)
    deployq.quantize(net, profile="ncnn")
    net.hybridize()
    x = mx.nd.random.normal(shape=(2, 3, 8, 8))
    with autograd.record():
        net(x).backward()
    y = net(x).asnumpy()
    net.export(str(tmp_path / "q"))
    ops = {n["op"] for n in json.loads((tmp_path / "q-symbol.json").read_text())["nodes"]}
    assert "Custom" not in ops and ("dq_act_quant" in ops) == deployq.native.available()
    back = gluon.SymbolBlock.imports(str(tmp_path / "q-symbol.json"), ["data"], str(tmp_path / "q-0000.params"))
    np.testing.assert_array_equal(back(x).asnumpy(), y)
    # with MXNet operators: the same outputs from a symbol of plain MXNet ops (reloads without deployq)
    deployq.use_native(net, False)
    np.testing.assert_array_equal(net(x).asnumpy(), y)
    net.export(str(tmp_path / "p"))
    ops = {n["op"] for n in json.loads((tmp_path / "p-symbol.json").read_text())["nodes"]}
    assert "round" in ops and not any(op.startswith("dq_") for op in ops)
    back = gluon.SymbolBlock.imports(str(tmp_path / "p-symbol.json"), ["data"], str(tmp_path / "p-0000.params"))
    np.testing.assert_array_equal(back(x).asnumpy(), y)


@pytest.mark.parametrize("algorithm", ["qat", "lsq", "dorefa", "naive", "bnn", "observer"])
def test_save_load_reproduces_outputs_exactly(tmp_path, algorithm):
    net = small_net(9)
    deployq.quantize(net, profile="ncnn", algorithm=algorithm)
    trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
    for _ in range(2):
        with autograd.record():
            loss = net(mx.nd.random.normal(shape=(4, 3, 8, 8))).sum()
        loss.backward()
        trainer.step(4)
    x = mx.nd.random.normal(shape=(3, 3, 8, 8))
    y = net(x).asnumpy()
    assert np.isfinite(y).all()
    deployq.save(net, tmp_path / "qnet", input_shape=(1, 3, 8, 8))
    fresh = small_net(123)
    back = deployq.load(tmp_path / "qnet", fresh)
    np.testing.assert_array_equal(back(x).asnumpy(), y)


def test_float_mode_restores_fp32_graph_and_fingerprint():
    net = small_net(10)
    x = mx.nd.random.normal(shape=(2, 3, 8, 8))
    ref = net(x).asnumpy()
    fp = deployq.fingerprint(net)
    deployq.quantize(net, profile="ncnn")
    with deployq.float_mode(net):
        np.testing.assert_array_equal(net(x).asnumpy(), ref)
    assert deployq.fingerprint(net) == fp
    assert np.abs(net(x).asnumpy() - ref).max() > 0


def test_export_scales_has_layer_inputs():
    net = small_net(11)
    deployq.quantize(net, profile="ncnn")
    with autograd.record():
        net(mx.nd.random.normal(shape=(4, 3, 8, 8))).backward()
    s = deployq.export_scales(net, "small")
    e = s["tensors"]["0:input"]
    assert e["step"] == pytest.approx(e["threshold"] / 127) and e["signed"] and s["profile"] == "ncnn"


def test_save_load_keeps_profile_options(tmp_path):
    """A profile changed with with_options (six-bit 3x3 weights for ncnn2int8's winograd) survives save/load."""
    prof = deployq.load_profile("ncnn").with_options(winograd_3x3="six_bit")
    net = small_net(11)
    deployq.quantize(net, profile=prof)
    with autograd.record():
        net(mx.nd.random.normal(shape=(4, 3, 8, 8))).backward()
    bits = {k: b.layer_config.weight.bits for k, b in deployq.quant_layers(net).items()}
    assert bits["0"] == 6 and max(bits.values()) == 8
    x = mx.nd.random.normal(shape=(3, 3, 8, 8))
    y = net(x).asnumpy()
    deployq.save(net, tmp_path / "q", input_shape=(1, 3, 8, 8))
    back = deployq.load(tmp_path / "q", small_net(12))
    assert {k: b.layer_config.weight.bits for k, b in deployq.quant_layers(back).items()} == bits
    assert next(iter(deployq.quant_layers(back).values())).profile == prof
    np.testing.assert_array_equal(back(x).asnumpy(), y)
