"""Block reconstruction (BRECQ + QDrop) and its engine: the cached walk computes what the simulation computes,
blocks are residual blocks / depthwise + pointwise pairs, learned codes stay on each layer's grid, the block's
output error on held-out images goes down, and a reconstructed net runs in ncnn's runtime as simulated."""

from __future__ import annotations

import numpy as np
import pytest
from deployq.calib.ptq.brecq import BrecqConfig, brecq
from deployq.calib.ptq.layers import fp32_graph, weight_codes, weight_grid_step
from deployq.calib.ptq.recon import NetWalk, block_units

import deployq
from deployq.data import load_mnist5k
from deployq.layerwise import calibrate_minmax
from deployq.zoo import get_trained, predict

W4A4 = [{"op_types": ["Conv2D", "Dense"], "quant_bits": {"weight": 4, "input": 4},
         "quant_dtype": {"weight": "int", "input": "uint"}}]


@pytest.fixture(scope="module")
def images():
    tr, te = load_mnist5k("train"), load_mnist5k("test")
    rng = np.random.default_rng(0)
    return tr.x[rng.choice(len(tr.x), 48, replace=False)], te.x[rng.choice(len(te.x), 64, replace=False)]


def _qnet(name: str, xc: np.ndarray, profile: str = "ncnn", cfg=None):
    net = deployq.quantize(get_trained(name, verbose=False), cfg, profile=profile)
    calibrate_minmax(net, xc)
    return net


@pytest.mark.parametrize("name,profile", [("resnet20", "custom"), ("mobilenet0.25", "custom"),
                                          ("resnet20", "tengine"), ("mobilenet0.25", "tengine"),
                                          ("resnet20", "onnx")])
def test_walk_computes_the_simulation(name, profile, images):
    """Advanced node by node with only the live tensors cached, the quantized path is the simulated net (its
    logits bit for bit; tengine and onnx: int32 biases, onnx's residual Adds with output quantizers) and the
    fp32 path the float net."""
    xc, xt = images
    net = _qnet(name, xc, profile, W4A4 if profile == "custom" else None)
    if profile == "onnx":
        from deployq.layerwise import calibrate_outputs

        assert deployq.api.output_quantizers(net)  # the residual Adds' inputs: in the walk
        calibrate_outputs(net, xc)
    g = fp32_graph(net, xt.shape[1:])
    walk = NetWalk(net, g, xt)
    walk.advance("q", len(g.nodes))
    walk.advance("fp", len(g.nodes))
    out = g.outputs[0]
    np.testing.assert_array_equal(walk.cache["q"][out], predict(net, xt))
    with deployq.float_mode(net):
        np.testing.assert_allclose(walk.cache["fp"][out], predict(net, xt), rtol=1e-4, atol=1e-4)


def test_blocks_are_residual_blocks_and_depthwise_pointwise_pairs(images):
    xc, _ = images
    net = _qnet("resnet20", xc)
    g = fp32_graph(net, xc.shape[1:])
    units = block_units(g, list(deployq.quant_layers(net)))
    res = [u for u in units if len(u.layers) > 1]
    assert len(res) == 9  # 3 stages x 3 basic blocks
    for u in res:
        assert len(u.inputs) == 1 and len(u.outputs) == 1
        assert len({p.rsplit(".", 2)[0] for p in u.layers}) == 1, u.layers  # one residual block each
        assert any(g.nodes[k].op == "elemwise_add" for k in u.nodes)
    net = _qnet("mobilenet0.25", xc)
    g = fp32_graph(net, xc.shape[1:])
    q = deployq.quant_layers(net)
    for u in block_units(g, list(q)):
        if len(u.layers) == 2:
            assert q[u.layers[0]]._groups > 1 and q[u.layers[1]]._groups == 1  # depthwise, then pointwise


def _block_error(net, g, u, x) -> float:
    walk = NetWalk(net, g, x)
    for path in ("q", "fp"):
        walk.advance(path, u.stop, keep=u.outputs)
    t = u.outputs[0]
    return float(np.mean((walk.cache["q"][t].astype(np.float64) - walk.cache["fp"][t]) ** 2))


def test_brecq_codes_on_the_grid_and_held_out_block_error_drops(images):
    """A residual block of resnet20 at W4A4 (custom): every learned code is floor or ceil of W_f / step on the
    layer's grid (the step kept), and the block output's error against fp32 on held-out images is lower than
    with nearest rounding."""
    xc, xt = images
    net = _qnet("resnet20", xc, "custom", W4A4)
    g = fp32_graph(net, xc.shape[1:])
    u = next(u for u in block_units(g, list(deployq.quant_layers(net))) if len(u.layers) == 3)  # with downsample
    q = deployq.quant_layers(net)
    grids = {p: weight_grid_step(q[p]) for p in u.layers}
    before = _block_error(net, g, u, xt)
    rep = brecq(net, xc, BrecqConfig(iters=60, batch_size=16, learn_ranges=False), layers=list(u.layers),
                reference=g)
    assert [r["layers"] for r in rep["units"]] == [list(u.layers)]
    for p, (wf, s, qmin, qmax) in grids.items():
        codes = weight_codes(q[p]).reshape(wf.shape)
        ws = wf / np.where(s > 0, s, 1)
        assert np.all((codes == np.floor(ws)) | (codes == np.ceil(ws))), p
        assert codes.min() >= qmin and codes.max() <= qmax
        _, s_after, _, _ = weight_grid_step(q[p])
        np.testing.assert_allclose(s_after, s, rtol=1e-6)
    assert any(rep["layers"][p]["codes_changed"] > 0 for p in u.layers)
    after = _block_error(net, g, u, xt)
    assert after < before


def test_brecq_net_verifies_in_ncnns_runtime(images, tmp_path):
    """The pipeline's brecq step (QDrop, learned input ranges) on resnet20, exported to ncnn: ncnn's runtime
    agrees with the simulation on every image."""
    pytest.importorskip("ncnn")
    from deployq.calib.ptq.pipeline import build
    from deployq.exporters.ncnn.runtime import export_and_run

    xc, xt = images
    te = load_mnist5k("test")
    net, detail = build(get_trained("resnet20", verbose=False), xc, "ncnn", None, "kl",
                        brecq=BrecqConfig(iters=8, batch_size=16))
    assert detail["brecq_blocks"] == 11
    r = export_and_run(net, tmp_path / "ncnn", te.x[:200], te.y[:200], "resnet20")
    assert r["agreement"] == 1.0
    assert r["accuracy"] >= 0.9


def test_brecq_config_rejects_bad_values():
    with pytest.raises(ValueError, match="BrecqConfig"):
        BrecqConfig(max_block_layers=0)
    with pytest.raises(ValueError, match="AdaRoundConfig"):
        BrecqConfig(qdrop=1.0)


@pytest.mark.parametrize("profile,command", [("tengine", "export-tengine"), ("onnx", "export-onnx")])
def test_brecq_net_with_int32_biases_exports_and_verifies(profile, command, images, tmp_path, capsys):
    """BRECQ (QDrop, learned input ranges) under profiles with int32 biases (tengine, onnx) and output
    quantizers (onnx: resnet20's residual Adds): the learned codes are what the exporter writes, and
    ``deployq verify`` finds the engine (Tengine's runtime or its NumPy model; onnxruntime) computing the
    simulation."""
    import json

    from deployq.calib.ptq.pipeline import build

    from deployq.cli import main

    xc, _ = images
    net, detail = build(get_trained("resnet20", verbose=False), xc, profile, None, "kl",
                        brecq=BrecqConfig(iters=8, batch_size=16))
    assert detail["brecq_blocks"] == 11
    if profile == "onnx":
        assert deployq.api.output_quantizers(net)
    learned = {p: weight_codes(b).copy() for p, b in deployq.quant_layers(net).items()}
    deployq.save(net, tmp_path / "q", model_name="resnet20")
    assert main([command, "--qnet", str(tmp_path / "q.params"), "--out", str(tmp_path / "out")]) == 0
    again = deployq.load(tmp_path / "q")
    for p, b in deployq.quant_layers(again).items():
        np.testing.assert_array_equal(weight_codes(b), learned[p])
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out"), "--limit", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] and doc["agreement_sim"] == 1.0, doc
