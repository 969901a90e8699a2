"""ONNX 4-bit containers: a net with 4-bit weights (``custom`` profile, ``quant_bits`` 4) exports INT4 weight
initializers (ONNX's packing) and UINT4 zero points on its 4-bit input grids (opset 21); onnxruntime's output
equals deployq's simulation within ``verify``'s thresholds. 8-bit exports keep opset 13 and int8 containers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from deployq.calib import apply, calibrate
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.ir.passes import optimize
from deployq.exporters.ir.qattach import attach_qnet
from deployq.exporters.onnx.export import export_qnet, pack_4bit, to_onnx
from onnx import TensorProto, numpy_helper

import deployq
from deployq.data import class_balanced_subset, load_mnist5k
from deployq.layerwise import calibrate_outputs
from deployq.verify import verify
from deployq.zoo import get_trained

LAYERS = ["Conv2D", "Dense"]


def _w4(name: str, a_bits: int, method: str = "mse"):
    """``name`` at W4A<a_bits> (unsigned inputs) but the first and last layer (W8A8), calibrated with ``method``
    (mse clips: the 4-bit input grids saturate on the calibration images)."""
    probe = list(deployq.quant_layers(deployq.quantize(get_trained(name, verbose=False), profile="custom")))
    cfg = [{"op_types": LAYERS, "quant_bits": {"weight": 4, "input": a_bits},
            "quant_dtype": {"weight": "int", "input": "uint"}},
           {"op_names": [probe[0], probe[-1]], "quant_bits": 8}]
    net = deployq.quantize(get_trained(name, verbose=False), cfg, profile="custom")
    tr = load_mnist5k("train")
    xc = tr.x[class_balanced_subset(tr.y, 7, 0)[:64]]
    apply(net, calibrate(net, xc, method=method, profile="custom", quiet=True))
    calibrate_outputs(net, xc)
    return net


@pytest.fixture(scope="module", params=[("resnet20", 4), ("mobilenet0.25", 8)], ids=["resnet20-w4a4", "mb-w4a8"])
def w4(request, tmp_path_factory):
    name, a = request.param
    net = _w4(name, a)
    out = tmp_path_factory.mktemp(f"{name}-w4a{a}")
    export_qnet(net, out, name, fp32=False)
    return name, a, net, out


def test_4bit_weights_are_packed_int4_initializers(w4):
    name, a, net, out = w4
    m = onnx.load(str(out / "model.onnx"))
    assert (m.opset_import[0].version, m.ir_version) == (21, 10)
    inits = {i.name: i for i in m.graph.initializer}
    g = attach_qnet(optimize(from_gluon(net, (1, 3, 32, 32), name=name)), net)
    kinds = []
    for n in g.nodes:
        wq = n.attrs.get("wq")
        if wq is None:
            continue
        t = inits[f"{n.params['weight']}.codes"]
        kinds.append(t.data_type)
        assert t.data_type == (TensorProto.INT4 if wq.bits == 4 else TensorProto.INT8), n.name
        codes = wq.codes.reshape(g.params[n.params["weight"]].shape)
        np.testing.assert_array_equal(numpy_helper.to_array(t), codes)
        if wq.bits == 4:  # ONNX's packing: element 2k in the low nibble of byte k
            flat = codes.reshape(-1).astype(np.int64)
            raw = np.frombuffer(t.raw_data, np.uint8)
            assert len(raw) == (flat.size + 1) // 2
            np.testing.assert_array_equal(raw[: flat.size // 2], (flat[0::2][: flat.size // 2] & 15)
                                          | ((flat[1::2] & 15) << 4))
            assert inits[f"{n.params['weight']}.zero_point"].data_type == TensorProto.INT4
    assert kinds[0] == kinds[-1] == TensorProto.INT8 and TensorProto.INT4 in kinds
    uint4 = [i for i in m.graph.initializer if i.name.endswith("zero_point") and i.data_type == TensorProto.UINT4]
    assert bool(uint4) == (a == 4)


@pytest.mark.parametrize("optimized", [False, True], ids=["ort-plain", "ort-optimized"])
def test_int4_export_equals_simulation_in_onnxruntime(w4, optimized):
    rep = verify(w4[3], limit=100, optimize=optimized)
    assert rep["passed"], rep["breaches"]
    assert rep["agreement_sim"] == 1.0
    assert rep["max_error_steps"] <= 1.0 and rep["mean_error_steps"] <= 0.1
    assert rep["accuracy"]["runtime"] == rep["accuracy"]["sim"]


def test_8bit_export_is_unchanged():
    net = deployq.quantize(get_trained("resnet20", verbose=False), profile="onnx")
    x = load_mnist5k("train").x[:16]
    apply(net, calibrate(net, x, method="minmax", profile="onnx", quiet=True))
    calibrate_outputs(net, x)
    gq = attach_qnet(optimize(from_gluon(net, (1, 3, 32, 32), name="r")), net)
    m = to_onnx(gq)
    assert (m.opset_import[0].version, m.ir_version) == (13, 8)
    assert not {TensorProto.INT4, TensorProto.UINT4} & {i.data_type for i in m.graph.initializer}
    assert m.SerializeToString(deterministic=True) == to_onnx(gq, int4=False).SerializeToString(deterministic=True)


def test_pack_4bit_pads_odd_counts_and_refuses_out_of_range():
    t = pack_4bit("w", np.array([1, -2, 7]), signed=True)
    assert t.raw_data == bytes([0x1 | (0xE << 4), 0x7]) and list(t.dims) == [3]
    np.testing.assert_array_equal(numpy_helper.to_array(t), [1, -2, 7])
    u = pack_4bit("z", np.array(15), signed=False)
    assert u.data_type == TensorProto.UINT4 and u.raw_data == bytes([15]) and list(u.dims) == []
    with pytest.raises(ValueError, match="w: codes in \\[-9, 0\\] do not fit INT4"):
        pack_4bit("w", np.array([-9, 0]), signed=True)
