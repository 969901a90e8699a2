"""Grouped convolutions (1 < groups < channels) in ncnn int8: one weight scale per group (ConvolutionDepthWise
with ``group``), in QAT / calibration (``deployq.quantize``) and the scale-file route (``attach_scales``), run in
ncnn's own runtime against deployq's simulation."""

from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ncnn.export import export_qnet, minmax_calibrate, qnet_graphs
from deployq.exporters.ncnn.runtime import run
from mxnet import autograd, gluon

import deployq
from deployq.cli import main
from deployq.layerwise import output_step
from deployq.zoo import predict

GROUPS = 4
SHAPE = (1, 3, 12, 12)


def _net(seed: int = 0) -> gluon.HybridBlock:
    """conv -> BN -> relu -> grouped 3x3 conv (4 groups of 4 channels) -> BN -> relu -> depthwise 3x3 -> pool ->
    dense; BN statistics random, so that the folded channels of a group have different max|W|."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(16, 3, padding=1, in_channels=3), gluon.nn.BatchNorm(in_channels=16),
            gluon.nn.Activation("relu"),
            gluon.nn.Conv2D(16, 3, padding=1, groups=GROUPS, in_channels=16), gluon.nn.BatchNorm(in_channels=16),
            gluon.nn.Activation("relu"),
            gluon.nn.Conv2D(16, 3, padding=1, groups=16, in_channels=16),
            gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(10, in_units=16))
    net.initialize(mx.init.Xavier(magnitude=2.0))
    for p in net.collect_params().values():
        if p.name.endswith(("gamma", "running_var")):
            p.set_data(mx.nd.array(rng.uniform(0.3, 2.0, p.shape[0])))
        elif p.name.endswith(("beta", "running_mean")):
            p.set_data(mx.nd.array(rng.normal(0, 0.2, p.shape[0])))
    net.hybridize()
    return net


def _images(n: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *SHAPE[1:])).astype(np.float32)


def _grouped_path(net) -> str:
    return next(p for p, b in deployq.quant_layers(net).items() if int(b._kwargs.get("num_group", 1)) == GROUPS)


def _per_group(values: np.ndarray) -> np.ndarray:
    """The per-channel values of the grouped layer, one per group (asserting they are constant in a group)."""
    v = np.asarray(values, np.float32).reshape(GROUPS, -1)
    np.testing.assert_array_equal(v, np.repeat(v[:, :1], v.shape[1], 1))
    return v[:, 0]


def _int8_layer(param_text: str, name: str) -> dict[str, str]:
    line = next(ln for ln in param_text.splitlines() if ln.split()[1:2] == [name])
    return {"type": line.split()[0], **dict(p.split("=", 1) for p in line.split()[6:] if "=" in p)}


def _check_ncnn(net, files, x) -> None:
    """ncnn's int8 model agrees with the simulation (top-1 and within one output step)."""
    out, sim = run(files["int8_param"], files["int8_bin"], x), predict(net, x)
    assert np.mean(out.argmax(1) == sim.argmax(1)) == 1.0
    assert np.abs(out - sim).max() <= output_step(net)


@pytest.mark.parametrize("algorithm", ["naive", "qat"])
def test_qnet_grouped_conv_per_group_in_ncnn(tmp_path, algorithm):
    net, x = _net(), _images()
    deployq.quantize(net, profile="ncnn", algorithm=algorithm)
    minmax_calibrate(net, x)
    path = _grouped_path(net)
    blk = deployq.quant_layers(net)[path]
    assert blk.layer_config.weight.granularity == "group" and blk.quantizer.units() == GROUPS
    if algorithm == "qat":  # two training steps: the grid stays one step per group
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
        y = mx.nd.array(np.arange(len(x)) % 10)
        for _ in range(2):
            with autograd.record():
                loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(mx.nd.array(x)), y)
            loss.backward()
            trainer.step(len(x))
    wq, step = blk.quantized_weight()
    step_g = _per_group(step)
    wf, _ = blk.folded_weight_bias()
    per_channel = np.abs(wf.reshape(16, -1)).max(1).reshape(GROUPS, -1)
    assert np.all(per_channel.max(1) > per_channel.min(1))  # per-group differs from per-channel here
    if algorithm == "naive":
        np.testing.assert_allclose(step_g, per_channel.max(1) / 127, rtol=1e-6)
    files = export_qnet(net, tmp_path, "g", SHAPE)
    layer = _int8_layer(files["int8_param"].read_text(), path)
    assert layer["type"] == "ConvolutionDepthWise" and layer["7"] == str(GROUPS) and layer["8"] in ("1", "101")
    _, gq = qnet_graphs(net, "g", SHAPE)
    codes = gq.node(path).attrs["wq"].codes
    np.testing.assert_array_equal(codes.reshape(wq.shape), np.round(wq / step.reshape(-1, 1, 1, 1)))
    table = {ln.split()[0]: ln.split()[1:] for ln in files["table"].read_text().splitlines()}
    np.testing.assert_allclose(np.array(table[f"{path}_param_0"], np.float32), 1 / step_g, rtol=1e-5)
    _check_ncnn(net, files, x)


def test_depthwise_keeps_per_channel_and_other_profiles_per_channel():
    net = _net()
    deployq.quantize(net, profile="ncnn")
    cfg = {p: b.layer_config.weight.granularity for p, b in deployq.quant_layers(net).items()}
    assert sorted(cfg.values()) == ["channel", "channel", "group", "group"]  # conv, dense | grouped, depthwise
    dw = next(b for b in deployq.quant_layers(net).values() if int(b._kwargs.get("num_group", 1)) == 16)
    assert dw.quantizer.units() == 16
    for profile in ("onnx", "tengine"):
        other = _net()
        deployq.quantize(other, profile=profile)
        blk = deployq.quant_layers(other)[_grouped_path(other)]
        assert blk.layer_config.weight.granularity == "channel" and blk.quantizer.units() == 16


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def test_scale_file_route_grouped_conv(tmp_path, capsys):
    """json/params + ``deployq calibrate`` + ``export-ncnn --symbol``: per-group weight multipliers (max|W| of the
    group), ncnn's int8 run agrees with ``deployq verify``'s simulation."""
    net, x = _net(), _images()
    net(mx.nd.array(x[:1]))
    net.export(str(tmp_path / "g"))
    sym, params = tmp_path / "g-symbol.json", tmp_path / "g-0000.params"
    np.savez(tmp_path / "x.npz", x=x)
    scales, out = tmp_path / "scales.json", tmp_path / "ncnn"
    shape = ",".join(map(str, SHAPE))
    assert _cli("calibrate", "--symbol", sym, "--params", params, "--input-shape", shape, "--data",
                tmp_path / "x.npz", "--method", "minmax", "--quiet", "--out", scales) == 0
    assert _cli("export-ncnn", "--symbol", sym, "--params", params, "--scales", scales, "--out", out) == 0
    capsys.readouterr()
    from deployq.exporters.ir import mxnet_lower
    from deployq.exporters.ir.annotate import load_scale_file
    from deployq.exporters.ncnn.export import file_graphs

    g, gq = file_graphs(sym, params, load_scale_file(scales), str(scales), SHAPE)
    node = next(n for n in gq.nodes if n.op == "Convolution" and n.attrs["num_group"] == GROUPS)
    w = g.param(node, "weight")
    want = np.float32(127) / np.abs(w.reshape(GROUPS, -1)).max(1).astype(np.float32)
    table = {ln.split()[0]: ln.split()[1:] for ln in (out / "g.table").read_text().splitlines()}
    np.testing.assert_allclose(np.array(table[f"{node.name}_param_0"], np.float32), want, rtol=1e-6)
    layer = _int8_layer((out / "g-int8.param").read_text(), node.name)
    assert layer["type"] == "ConvolutionDepthWise" and layer["7"] == str(GROUPS)
    fp32 = run(out / "g.param", out / "g.bin", x)
    ref = mxnet_lower.run(g, x)[g.outputs[0]].reshape(len(x), -1)
    assert np.abs(fp32 - ref).max() / np.abs(ref).max() <= 1e-4
    assert _cli("verify", out, "--data", tmp_path / "x.npz", "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["passed"] and rep["agreement_sim"] == 1.0 and rep["max_error_steps"] <= 1.0


def _grouped_config(scheme: str) -> list[dict]:
    return [{}, {"op_names": ["3"], "quant_types": ["weight", "input"], "quant_scheme": scheme}]


def test_per_tensor_grouped_conv_exports_one_multiplier(tmp_path):
    """A per-tensor grid on the grouped conv: every channel's recorded threshold is the layer's max|W|, so ncnn
    gets one multiplier repeated on the groups and computes what was simulated."""
    net, x = _net(), _images()
    deployq.quantize(net, _grouped_config("per_tensor_symmetric"), profile="ncnn")
    minmax_calibrate(net, x)
    blk = deployq.quant_layers(net)["3"]
    assert blk.layer_config.weight.granularity == "layer"
    files = export_qnet(net, tmp_path, "t", SHAPE)
    table = {ln.split()[0]: ln.split()[1:] for ln in files["table"].read_text().splitlines()}
    wf, _ = blk.folded_weight_bias()
    np.testing.assert_allclose(np.array(table["3_param_0"], np.float32), 127 / np.abs(wf).max(), rtol=1e-6)
    assert len(table["3_param_0"]) == GROUPS
    _check_ncnn(net, files, x)


def test_per_channel_grouped_conv_refused_in_int8_still_writes_the_fp32_model(tmp_path, capsys):
    """A grouped conv forced per channel cannot be written in ncnn's int8 (one weight scale per group): the int8
    model, table and Caffe pair are left out with a warning naming the layer; the fp32 model is written and
    runs in ncnn's runtime as the fp32 net; verify says why there is no int8 model (exit 3)."""
    from deployq.exporters.ncnn.export import Int8SkippedWarning

    net, x = _net(), _images()
    deployq.quantize(net, _grouped_config("per_channel_symmetric"), profile="ncnn")
    minmax_calibrate(net, x)
    with pytest.warns(Int8SkippedWarning, match=r"layer '3' \(Convolution, 4 groups\).*one weight scale per group"):
        files = export_qnet(net, tmp_path / "e", "c", SHAPE)
    assert {"fp32_param", "fp32_bin", "scales"} <= set(files)
    assert not {"int8_param", "int8_bin", "table", "prototxt"} & set(files)
    assert not list((tmp_path / "e").glob("*-int8.*")) and not list((tmp_path / "e").glob("*.table"))
    man = json.loads(files["manifest"].read_text())
    assert "one weight scale per group" in man["int8_refused"] and "param" not in man["files"]
    with deployq.float_mode(net):
        want = net(mx.nd.array(x[:8])).asnumpy()
    got = run(files["fp32_param"], files["fp32_bin"], x[:8])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    capsys.readouterr()
    assert _cli("verify", tmp_path / "e", "--engine", "ncnn", "--data", "none") == 3
    assert "has no int8 model" in capsys.readouterr().err
