"""ACIQ and EasyQuant against literal transcriptions of ncnn2table; CLE, bias correction and AdaRound on
trained MNIST-5k models (deployq's simulation and the exporters' codes as the references)."""

from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import calibrate
from deployq.calib.ptq import AdaRoundConfig, adaround, bias_correction, equalize
from deployq.calib.ptq.layers import fp32_graph, weight_grid_step

import deployq
from deployq.data import load_mnist5k
from deployq.layerwise import calibrate_minmax, run_layers
from deployq.zoo import get_trained, predict


@pytest.fixture(scope="module")
def images():
    tr, te = load_mnist5k("train"), load_mnist5k("test")
    rng = np.random.default_rng(0)
    return tr.x[rng.choice(len(tr.x), 64, replace=False)], te.x[rng.choice(len(te.x), 128, replace=False)]


def ncnn_aciq(absmax: float, n: int) -> float:
    """ncnn2table.cpp ``compute_aciq_gaussian_clip`` (8 bits), transcribed."""
    alpha = 3.92403714
    gaussian_const = (0.5 * 0.35) * (1 + math.sqrt(3.14159265358979323846 * math.log(4)))
    std = (absmax * 2 * gaussian_const) / math.sqrt(2 * math.log(n))
    return float(np.float32(alpha * std))


def test_aciq_thresholds_are_ncnn2tables(images):
    xc, _ = images
    net = get_trained("resnet20", verbose=False)
    mm = calibrate(net, xc, method="minmax", profile="ncnn", quiet=True)
    sf = calibrate(net, xc, method="aciq", profile="ncnn", quiet=True)
    g = fp32_graph(net, xc.shape[1:])
    from deployq.exporters.ir.mxnet_lower import tensor_shapes

    shapes = tensor_shapes(g, 1)
    for key, r in sf.tensors.items():
        n = int(np.prod(shapes[g.node(r.layer).inputs[0]]))
        want = ncnn_aciq(float(np.float32(mm.tensors[key].threshold)), n)
        assert r.threshold == pytest.approx(want, rel=1e-6), key
        assert (r.lo, r.hi) == (-r.threshold, r.threshold)  # the grid spans [-T, T], also where T > max |x|
    assert any(r.threshold > mm.tensors[k].threshold for k, r in sf.tensors.items())


def test_eq_search_maximises_the_cosine_of_the_dense_layer(images):
    """The last (Dense) layer by brute force in NumPy: ncnn2table's candidates around the KL scale, the int8
    output's cosine similarity with the fp32 output summed over the images, first maximum."""
    xc, _ = images
    net = get_trained("resnet20", verbose=False)
    steps, n_img = 12, 16
    kl = calibrate(net, xc, method="kl", profile="ncnn", quiet=True, max_clipped_share=None)
    sf = calibrate(net, xc, method="eq", profile="ncnn", quiet=True, eq_images=n_img, steps=steps)
    g = fp32_graph(net, xc.shape[1:])
    node = g.node("output")
    from deployq.exporters.ir.mxnet_lower import run

    x = run(g, xc[:n_img], outputs=[node.inputs[0]])[node.inputs[0]].reshape(n_img, -1)
    w, b = g.param(node, "weight"), g.param(node, "bias")
    ref = x @ w.T + b
    m_w = np.float32(127) / np.abs(w).max(1, keepdims=True).astype(np.float32)
    wq = np.clip(np.sign(w * m_w) * np.floor(np.abs(w * m_w) + 0.5), -127, 127) / m_w
    s = np.float32(127 / kl.tensors["output:input"].threshold)
    lo, hi = s * np.float32(0.5), s * np.float32(2.0)
    step = (hi - lo) / np.float32(steps)
    sims = []
    for k in range(steps):
        sk = np.float32(lo + np.float32(k) * step)
        xq = np.clip(np.sign(x * sk) * np.floor(np.abs(x * sk) + 0.5), -127, 127) / sk
        out = xq @ wq.T + b
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        sims.append(cos.sum())
    best = lo + np.float32(int(np.argmax(sims))) * step
    assert sf.tensors["output:input"].threshold == pytest.approx(127 / best, rel=1e-5)
    assert sf.tensors["output:input"].method == "eq"


@pytest.mark.parametrize("name", ["mobilenet0.25", "resnet20"])
def test_cle_keeps_fp32_outputs_and_balances_ranges(name, images):
    _, xt = images
    net = get_trained(name, verbose=False)
    ref = predict(net, xt)
    deployq.quantize(net, profile="ncnn")
    q = deployq.quant_layers(net)
    def rowmax(p):
        w = q[p].folded_weight_bias()[0]
        return np.abs(w.reshape(len(w), -1)).max(1)

    before_max = {p: rowmax(p) for p in q}
    rep = equalize(net, xt.shape[1:])
    assert rep["pairs"]
    for _, b in rep["pairs"]:  # per-channel grids: no output channel's step of a (non-depthwise) layer 2 grows
        if q[b]._groups == 1:
            assert np.all(rowmax(b) <= before_max[b] * (1 + 1e-5)), b
    with deployq.float_mode(net):
        out = predict(net, xt)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    before, after = np.array(list(rep["balance"].values())).T
    assert after.mean() > before.mean()


def _w4a8(name: str, xc: np.ndarray):
    net = get_trained(name, verbose=False)
    deployq.quantize(net, [{"op_types": ["Conv2D", "Dense"], "quant_bits": {"weight": 4, "input": 8}}],
                     profile="custom")
    calibrate_minmax(net, xc)
    return net


def _fp32_layer_outputs(net, x) -> dict[str, np.ndarray]:
    """Every quantized layer's BN-folded fp32 output (the exporters' fp32 graph IR)."""
    from deployq.exporters.ir.mxnet_lower import run

    g = fp32_graph(net, x.shape[1:])
    out = {p: g.node(p).output for p in deployq.quant_layers(net)}
    acts = run(g, x, outputs=sorted(set(out.values())))
    return {p: acts[t] for p, t in out.items()}


def _mean_errors(net, x, f: dict[str, np.ndarray]) -> np.ndarray:
    """Per layer, the mean |channel mean of (simulated - fp32) layer output| (deployq's own simulation; ``f``:
    the fp32 layer outputs before any correction, which also changes the fp32 graph's biases)."""
    _, q = run_layers(net, x)
    return np.array([np.abs(np.moveaxis(q[k] - f[k], 1, 0).reshape(q[k].shape[1], -1).mean(1)).mean() for k in q])


def test_bias_correction_moves_the_mean_error_toward_zero(images):
    xc, xt = images
    net = _w4a8("resnet20", xc)
    fp = get_trained("resnet20", verbose=False)
    f = _fp32_layer_outputs(net, xt)
    before = _mean_errors(net, xt, f)
    logit_bias_before = np.abs((predict(net, xt) - predict(fp, xt)).mean(0)).mean()
    bias_correction(net, xc[:32])
    after = _mean_errors(net, xt, f)  # held-out images
    logit_bias_after = np.abs((predict(net, xt) - predict(fp, xt)).mean(0)).mean()
    assert after.mean() < 0.5 * before.mean()
    assert logit_bias_after < logit_bias_before


def _codes_on_grid(codes: np.ndarray, w_over_s: np.ndarray) -> bool:
    return bool(np.all((codes == np.floor(w_over_s)) | (codes == np.ceil(w_over_s))))


@pytest.mark.parametrize("profile,layers", [
    ("custom_w4a8", ["features.0", "features.2.0.body.0"]),
    ("ncnn_six_bit", ["features.2.0.body.0"]),     # 3x3 stride-1 conv: 6-bit weights, codes in [-31, 31]
    ("tengine", ["features.2.0.body.3"]),
])
def test_adaround_codes_stay_on_the_grid_and_export_unchanged(profile, layers, images):
    from deployq.exporters.ncnn.export import qnet_graphs

    xc, xt = images
    if profile == "custom_w4a8":
        net = _w4a8("resnet20", xc)
    else:
        prof = deployq.load_profile("ncnn").with_options(winograd_3x3="six_bit") if profile == "ncnn_six_bit" \
            else profile
        net = deployq.quantize(get_trained("resnet20", verbose=False), profile=prof)
        calibrate_minmax(net, xc)
    q = deployq.quant_layers(net)
    grids = {p: weight_grid_step(q[p]) for p in layers}
    _, f = run_layers(net, xt, ["features.0"], fp32=True)
    _, before = run_layers(net, xt, ["features.0"])
    rep = adaround(net, xc, AdaRoundConfig(iters=30, batch_size=16), layers=layers, diagnose=True)
    _, gq = qnet_graphs(net, "resnet20")
    for p in layers:
        wf, s, qmin, qmax = grids[p]
        if profile == "ncnn_six_bit":
            assert qmax == 31
        codes = gq.node(p).attrs["wq"].codes.reshape(wf.shape)  # what every exporter writes
        assert _codes_on_grid(codes, wf / np.where(s > 0, s, 1))
        assert codes.min() >= qmin and codes.max() <= qmax
        assert rep["layers"][p]["mse_learned"] < rep["layers"][p]["mse_nearest"]
        np.testing.assert_allclose(gq.node(p).attrs["wq"].step, s.reshape(-1), rtol=1e-6)  # the step is kept
    if "features.0" in layers:  # reconstruction reduces the layer's output error on held-out images
        _, after = run_layers(net, xt, ["features.0"])
        err = lambda o: float(np.mean((o["features.0"] - f["features.0"]) ** 2))  # noqa: E731
        assert err(after) < err(before)


def test_adaround_on_ncnn_depthwise_per_group_grid(images):
    xc, _ = images
    net = deployq.quantize(get_trained("mobilenet0.25", verbose=False), profile="ncnn")
    calibrate_minmax(net, xc)
    q = deployq.quant_layers(net)
    dw = next(p for p, b in q.items() if b._groups > 1)
    wf, s, _, _ = weight_grid_step(q[dw])
    rep = adaround(net, xc, AdaRoundConfig(iters=40, batch_size=16, qdrop=0.5), layers=[dw], diagnose=True)
    from deployq.calib.ptq.layers import weight_codes

    assert _codes_on_grid(weight_codes(q[dw]).reshape(wf.shape), wf / np.where(s > 0, s, 1))
    assert rep["layers"][dw]["mse_learned"] <= rep["layers"][dw]["mse_nearest"]


def test_adaround_config_rejects_bad_values():
    with pytest.raises(ValueError, match="AdaRoundConfig"):
        AdaRoundConfig(iters=0)
    with pytest.raises(ValueError, match="AdaRoundConfig"):
        AdaRoundConfig(qdrop=1.0)


def test_calibrate_cli_takes_aciq(tmp_path):
    from deployq.cli import main

    assert main(["calibrate", "--model", "resnet20", "--method", "aciq", "--num-sample", "2", "--quiet",
                 "--out", str(tmp_path / "s.json")]) == 0
    import json

    doc = json.loads((tmp_path / "s.json").read_text())
    assert {t["method"] for t in doc["tensors"].values()} == {"aciq"}
    mx.nd.waitall()
