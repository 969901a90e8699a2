"""ONNX exporter: structure, fp32 parity, QDQ parity with the simulation in onnxruntime, errors, determinism."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from deployq.exporters.ir.graph import UnsupportedOpError
from deployq.exporters.onnx.export import export_qnet, to_onnx

import deployq
from deployq.api import output_quantizers
from deployq.data import load_mnist5k
from deployq.layerwise import calibrate_minmax, output_step, run_layers
from deployq.zoo import get_trained


def session(path, optimize: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["mobilenet0.25", "resnet20"])
def exported(request, tmp_path_factory):
    name = request.param
    qnet = deployq.quantize(get_trained(name, verbose=False), profile="onnx")
    calibrate_minmax(qnet, load_mnist5k("train").x[:500])
    out = tmp_path_factory.mktemp(name)
    files = export_qnet(qnet, out, name)
    x = load_mnist5k("test").x
    sim, _ = run_layers(qnet, x)
    f32, _ = run_layers(qnet, x, fp32=True)
    return name, qnet, files, x, sim, f32


def test_structure(exported):
    name, qnet, files, *_ = exported
    m = onnx.load(str(files["model"]))
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert "BatchNormalization" not in ops
    assert m.opset_import[0].version >= 13
    assert [i.name for i in m.graph.input] == ["data"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    n_layers = len(deployq.quant_layers(qnet))
    assert ops.count("Conv") + ops.count("Gemm") == n_layers
    w_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("weight.DequantizeLinear")]
    assert len(w_dq) == n_layers
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    codes = [v for k, v in inits.items() if k.endswith(".codes") and ".bias" not in k]
    assert all(c.dtype == np.int8 and np.abs(c).max() <= 127 for c in codes)
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.uint8 for z in zps)
    assert any(int(z) > 0 for z in zps)  # the first layer reads normalised (signed) images: affine
    f = onnx.load(str(files["fp32"]))
    assert {n.op_type for n in f.graph.node}.isdisjoint({"QuantizeLinear", "DequantizeLinear", "BatchNormalization"})
    man = json.loads((files["model"].parent / "deployq-export.json").read_text())
    assert man["engine"] == "onnxruntime" and man["files"]["model"] == "model.onnx"


def test_fp32_parity(exported):
    _, _, files, x, _, f32 = exported
    y = session(files["fp32"]).run(None, {"data": x})[0]
    assert np.abs(y - f32).max() / np.abs(f32).max() <= 1e-5


def test_qdq_parity_with_simulation(exported):
    name, qnet, files, x, sim, _ = exported
    y = session(files["model"]).run(None, {"data": x})[0]
    step = output_step(qnet)
    assert (y.argmax(1) == sim.argmax(1)).mean() == 1.0
    assert np.abs(y - sim).max() <= step, f"{name}: max error {np.abs(y - sim).max() / step:.3f} output steps"


def test_qdq_default_optimizations_match_simulation(exported):
    """ORT's default optimizations fuse QDQ into QLinearConv (U8S8 integer kernels), which add the bias as int32
    codes on the grid input_step * weight_step; the `onnx` profile (bias: int32) simulates exactly that and the
    export writes those codes, so the optimized session agrees with the simulation as the unoptimized one does."""
    name, qnet, files, x, sim, _ = exported
    assert deployq.load_profile("onnx").bias == "int32"
    y = session(files["model"], optimize=True).run(None, {"data": x})[0]
    assert (y.argmax(1) == sim.argmax(1)).mean() == 1.0
    assert np.abs(y - sim).max() <= output_step(qnet), f"{name}: max {np.abs(y - sim).max() / output_step(qnet)}"
    assert np.abs(y - sim).mean() / output_step(qnet) < 0.01


def ort_optimized_ops(path, tmp_path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs with its default optimizations."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "ort-optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for n in onnx.load(so.optimized_model_filepath).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_ort_runs_the_qdq_model_on_integers(exported, tmp_path):
    """quantize_outputs (onnx profile): every layer output read by a non-layer op, and every residual block output,
    has a QuantizeLinear, so onnxruntime fuses every Conv into QLinearConv, every Add into QLinearAdd, the pooling
    into QLinearGlobalAveragePool and the Dense into QGemm (its input quantized before the Flatten): one
    QuantizeLinear at the input, no float compute op left."""
    name, qnet, files, *_ = exported
    ops = ort_optimized_ops(files["model"], tmp_path)
    convs = sum(b.layer_config.op_type == "Conv2D" for b in deployq.quant_layers(qnet).values())
    assert ops["QLinearConv"] == convs and ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    assert ops.get("QLinearAdd", 0) == (9 if name == "resnet20" else 0)
    assert ops["QuantizeLinear"] == 1 and "DequantizeLinear" not in ops
    assert set(ops).isdisjoint({"Conv", "FusedConv", "Add", "Relu", "GlobalAveragePool", "Gemm"}), ops
    m = onnx.load(str(files["model"]))
    oq = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.output[0].endswith(".oq")]
    n_out = sum(b.layer_config.output is not None for b in deployq.quant_layers(qnet).values())
    assert len(oq) == n_out + len(output_quantizers(qnet)) > 0


def test_unset_output_ranges_stay_float(tmp_path):
    """Input ranges set, output ranges not (e.g. deployq.calib.apply): those outputs stay float in the simulation,
    the export writes no QDQ there (and warns), and onnxruntime still computes what deployq simulated."""
    probe = deployq.quantize(get_trained("resnet20", verbose=False), profile="onnx")
    ranges = calibrate_minmax(probe, load_mnist5k("train").x[:200])
    qnet = deployq.quantize(get_trained("resnet20", verbose=False), profile="onnx")
    for path, blk in deployq.quant_layers(qnet).items():
        blk.set_input_range(*ranges[path])
    with pytest.warns(UserWarning, match="no range"):
        files = export_qnet(qnet, tmp_path, "resnet20", fp32=False)
    m = onnx.load(str(files["model"]))
    assert not any(n.output[0].endswith(".oq") for n in m.graph.node)
    x = load_mnist5k("test").x[:200]
    sim, _ = run_layers(qnet, x)
    for optimize in (False, True):
        y = session(files["model"], optimize).run(None, {"data": x})[0]
        assert (y.argmax(1) == sim.argmax(1)).all() and np.abs(y - sim).max() <= output_step(qnet)


def test_int32_bias_same_in_both_ort_modes(exported, tmp_path):
    """int32_bias: int32 codes + DequantizeLinear on input_step * weight_step, so that the unoptimized session and
    the fused QLinearConv kernels add the same bias and agree with each other."""
    name, qnet, _, x, *_ = exported
    files = export_qnet(qnet, tmp_path, name, fp32=False, int32_bias=True)
    m = onnx.load(str(files["model"]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    b_dq = [n for n in m.graph.node if n.name.endswith(".bias.DequantizeLinear")]
    assert len(b_dq) == len(deployq.quant_layers(qnet))
    for n in b_dq:
        conv = next(c for c in m.graph.node if n.output[0] in c.input)
        x_dq = next(d for d in m.graph.node if d.output[0] == conv.input[0])
        w_dq = next(d for d in m.graph.node if d.output[0] == conv.input[1])
        codes, grid = inits[n.input[0]], inits[n.input[1]]
        assert codes.dtype == np.int32 and inits[n.input[2]].dtype == np.int32 and not inits[n.input[2]].any()
        np.testing.assert_array_equal(grid, np.float32(inits[x_dq.input[1]]) * inits[w_dq.input[1]])
    y0 = session(files["model"]).run(None, {"data": x})[0]
    y1 = session(files["model"], optimize=True).run(None, {"data": x})[0]
    assert (y0.argmax(1) == y1.argmax(1)).mean() == 1.0
    assert np.abs(y0 - y1).max() <= output_step(qnet)


def test_byte_identical_rerun(exported, tmp_path):
    name, qnet, files, *_ = exported
    again = export_qnet(qnet, tmp_path, name)
    for k in ("model", "fp32", "scales"):
        assert again[k].read_bytes() == files[k].read_bytes(), k
    assert not list(tmp_path.glob(".*tmp*"))


def test_excluded_layer_has_no_qdq(tmp_path):
    net = get_trained("resnet20", verbose=False)
    keep = "features.0"
    qnet = deployq.quantize(net, [{"op_types": ["Conv2D", "Dense"]}, {"op_names": [keep], "exclude": True}],
                            profile="onnx")
    calibrate_minmax(qnet, load_mnist5k("train").x[:200])
    files = export_qnet(qnet, tmp_path, "resnet20", fp32=False)
    m = onnx.load(str(files["model"]))
    conv = next(n for n in m.graph.node if n.name == keep)
    assert conv.input[0] == "data" and not conv.input[1].endswith(".dq")
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "data" for n in m.graph.node)
    x = load_mnist5k("test").x[:200]
    sim, _ = run_layers(qnet, x)
    y = session(files["model"]).run(None, {"data": x})[0]
    assert (y.argmax(1) == sim.argmax(1)).all() and np.abs(y - sim).max() <= output_step(qnet)


def test_unsupported_op_names_node_and_op(exported):
    from deployq.exporters.ir.frontend import from_gluon
    from deployq.exporters.ir.passes import optimize

    _, qnet, *_ = exported
    g = optimize(from_gluon(qnet))
    g.nodes[1].op = "Crop"
    with pytest.raises(UnsupportedOpError, match=rf"{g.nodes[1].name}.*op Crop"):
        to_onnx(g)


def test_not_quantized_net_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantized net"):
        export_qnet(get_trained("resnet20", verbose=False), tmp_path)
