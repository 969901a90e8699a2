"""ncnn's own runtime (PyPI ``ncnn``) against MXNet (fp32) and deployq's simulation (int8), trained models."""

from __future__ import annotations

import numpy as np
import pytest
from deployq.exporters.ir import mxnet_lower
from deployq.exporters.ncnn.export import balanced_images, export_qnet, minmax_calibrate, qnet_graphs
from deployq.exporters.ncnn.lower import float2int8, lower
from deployq.exporters.ncnn.runtime import export_and_run, run

import deployq
from deployq.data import load_mnist5k
from deployq.layerwise import output_step
from deployq.zoo import get_trained, predict

from .conftest import MODELS


def _ptq(name: str, profile: str | deployq.Profile = "ncnn", config_list=None):
    net = get_trained(name, verbose=False)
    deployq.quantize(net, config_list, profile=profile)
    minmax_calibrate(net, balanced_images(20))
    return net


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    name = request.param
    net = _ptq(name)
    files = export_qnet(net, tmp_path_factory.mktemp(name), name)
    return name, net, files


def test_fp32_matches_mxnet(exported):
    name, net, files = exported
    x = load_mnist5k("test").x[:300]
    g, _ = qnet_graphs(net, name)
    ref = mxnet_lower.run(g, x)["output"]
    out = run(files["fp32_param"], files["fp32_bin"], x)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_int8_matches_simulation(exported):
    name, net, files = exported
    te = load_mnist5k("test")
    sim = predict(net, te.x)
    out = run(files["int8_param"], files["int8_bin"], te.x)
    agreement = np.mean(out.argmax(1) == sim.argmax(1))
    per_image = np.abs(out - sim).max(1)
    err, step = float(per_image.max()), output_step(net)
    exact = float(np.mean(per_image <= 1e-3))
    print(f"{name}: agreement {agreement:.4f}, max logit error {err:.4g}, output step {step:.4g}, "
          f"images within 1e-3: {exact:.3f}")
    assert agreement == 1.0
    assert err <= step
    assert exact >= 0.85  # the rest differ by int8 rounding flips from float summation order
    assert np.mean(out.argmax(1) == te.y) >= 0.85


def test_int8_codes_are_the_simulation_codes(exported):
    name, net, _ = exported
    _, gq = qnet_graphs(net, name)
    model = lower(gq, int8=True)
    n = 0
    for node in gq.nodes:
        if "wq" not in node.attrs:
            continue
        codes = model.layer(node.name).weights[0].data
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes.astype(np.int32), node.attrs["wq"].codes.reshape(codes.shape))
        n += 1
    assert n == len(deployq.quant_layers(net))


def test_requantize_fusion_and_winograd_guard(exported):
    name, net, files = exported
    text = files["int8_param"].read_text().splitlines()[2:]
    terms = {ln.split()[1]: dict(p.split("=", 1) for p in ln.split()[6:] if "=" in p) for ln in text}
    if name == "mobilenet0.25":  # conv -> conv chains: everything but the last conv emits int8
        assert terms["features.0"]["8"] == "102" and terms["features.3"]["8"] == "101"
        assert terms["features.78"]["8"] == "2" and terms["output"]["8"] == "2"
        assert "31" not in terms["features.3"]  # depthwise: no winograd
    else:  # resnet20: body.0 -> body.3 fuses; convs before Eltwise do not
        assert terms["features.2.0.body.0"]["8"] == "102" and terms["features.2.0.body.3"]["8"] == "2"
        assert terms["features.2.0.body.3"]["31"] == "64" and "31" not in terms["features.3.0.downsample.0"]


def test_excluded_layer_stays_fp32(tmp_path):
    net = _ptq("resnet20", config_list=[{}, {"op_names": ["features.3.1.body.0"], "exclude": True}])
    files = export_qnet(net, tmp_path, "r")
    line = next(ln for ln in files["int8_param"].read_text().splitlines() if " features.3.1.body.0 " in ln)
    assert " 8=" not in line
    table = files["table"].read_text()
    assert "features.3.1.body.0" not in table and "features.3.1.body.3 " in table
    x = load_mnist5k("test").x[:200]
    out, sim = run(files["int8_param"], files["int8_bin"], x), predict(net, x)
    assert np.mean(out.argmax(1) == sim.argmax(1)) == 1.0 and np.abs(out - sim).max() <= output_step(net)


def test_six_bit_winograd(tmp_path):
    prof = deployq.load_profile("ncnn").with_options(winograd_3x3="six_bit")
    net = _ptq("resnet20", profile=prof)
    files = export_qnet(net, tmp_path, "r6")
    assert "31=64" not in files["int8_param"].read_text()
    _, gq = qnet_graphs(net, "r6")
    node = gq.node("features.2.0.body.0")
    w = gq.param(node, "weight")
    row = next(ln for ln in files["table"].read_text().splitlines() if ln.startswith("features.2.0.body.0_param_0"))
    mult = np.array(row.split()[1:], np.float32)
    np.testing.assert_array_equal(mult, np.float32(31) / np.abs(w.reshape(len(w), -1)).max(1))
    assert np.abs(float2int8(w * mult[:, None, None, None])).max() <= 31
    x = load_mnist5k("test").x[:200]
    out, sim = run(files["int8_param"], files["int8_bin"], x), predict(net, x)
    assert np.mean(out.argmax(1) == sim.argmax(1)) == 1.0 and np.abs(out - sim).max() <= output_step(net)


def test_export_and_run(tmp_path):
    net = _ptq("mobilenet0.25")
    te = load_mnist5k("test")
    res = export_and_run(net, tmp_path, te.x[:200], te.y[:200], name="m")
    assert res["agreement"] == 1.0 and res["accuracy"] >= 0.85
    assert (tmp_path / "m-int8.param").exists()
