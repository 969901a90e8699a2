"""deployq verify: onnxruntime export vs simulation, thresholds as a CI gate, JSON, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from deployq.exporters.onnx.export import export_qnet

import deployq
from deployq.cli import main
from deployq.data import load_mnist5k
from deployq.errors import InputError
from deployq.layerwise import calibrate_minmax
from deployq.verify import Thresholds, load_data, verify
from deployq.zoo import get_trained


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    qnet = deployq.quantize(get_trained("resnet20", verbose=False), profile="onnx")
    calibrate_minmax(qnet, load_mnist5k("train").x[:200])
    d = tmp_path_factory.mktemp("resnet20")
    export_qnet(qnet, d, "resnet20", fp32=False)
    return d


def test_onnxruntime_matches_simulation(export_dir):
    rep = verify(export_dir, "onnxruntime", limit=200)
    assert rep["passed"], rep["breaches"]
    assert rep["agreement_sim"] == 1.0 and rep["max_error_steps"] <= 1.0
    assert len(rep["layers"]) == 22 and min(r["cosine_sim"] for r in rep["layers"]) > 0.9999
    assert min(r["sqnr_sim_db"] for r in rep["layers"]) > 40
    assert 15 < rep["sqnr_fp32_db"] < 60  # quantization noise vs fp32 is real but small


def test_cli_gate_and_json(export_dir, capsys):
    assert main(["verify", str(export_dir), "--limit", "100", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["engine"] == "onnxruntime" and rep["passed"]
    # an impossible threshold is a breach -> exit 3
    assert main(["verify", str(export_dir), "--limit", "50", "--no-layers", "--max-error-steps", "0"]) == 4  # breach
    assert "FAILED" in capsys.readouterr().out


def test_npz_data(export_dir, tmp_path):
    x = load_mnist5k("test").x[:20]
    np.savez(tmp_path / "d.npz", x=x)
    rep = verify(export_dir, "onnxruntime", data=str(tmp_path / "d.npz"), layers=False,
                 thresholds=Thresholds(mean_error_steps=1.0))
    assert rep["images"] == 20 and rep["agreement_sim"] == 1.0


def test_bad_inputs(export_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="deployq-export.json"):
        verify(tmp_path)
    with pytest.raises(ValueError, match="unknown engine"):
        verify(export_dir, "tensorrt")
    with pytest.raises(InputError, match="no such file or folder"):
        load_data("nonsense", (1, 3, 32, 32))
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="shape"):
        load_data(str(tmp_path / "bad.npz"), (1, 3, 32, 32))
    assert main(["verify", str(tmp_path)]) == 3  # bad input (deployq.errors)


@pytest.fixture(scope="module")
def ncnn_dir(tmp_path_factory):
    """``deployq export-ncnn --model resnet20`` (min-max over 200 class-balanced images)."""
    d = tmp_path_factory.mktemp("ncnn")
    assert main(["export-ncnn", "--model", "resnet20", "--calib-per-class", "20", "--out", str(d)]) == 0
    return d


def test_ncnn_export_verifies_in_ncnn_per_layer(ncnn_dir, capsys):
    """verify --engine ncnn: logits and every quantized layer's blob against the simulation. Requantized
    blobs hold int8 codes: compared after dequantization against the simulation on the same grid."""
    capsys.readouterr()
    assert main(["verify", str(ncnn_dir), "--engine", "ncnn", "--limit", "200", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["engine"] == "ncnn" and rep["agreement_sim"] == 1.0 and rep["mean_error_steps"] < 0.05, rep
    assert len(rep["layers"]) == 22
    assert min(r["cosine_sim"] for r in rep["layers"]) >= 0.99
    assert min(r["sqnr_sim_db"] for r in rep["layers"]) > 40  # raw int8 codes (not dequantized) would be < 0 dB
    int8_blobs = [r for r in rep["layers"] if "int8 codes" in r["compared"]]
    assert len(int8_blobs) == 9 and all(r["blob"].endswith("body.2") for r in int8_blobs)  # conv+relu, requantized
    # the runtime is much closer to the simulation than to fp32 on every layer
    assert all(r["sqnr_sim_db"] > r["sqnr_fp32_db"] + 10 for r in rep["layers"])


def test_ncnn_layer_reference_is_the_blob():
    """An int8 blob (codes of relu(y) on the top grid) is reproduced exactly from the layer output y."""
    from deployq.verify import ncnn_layer_reference

    y = np.array([-1.0, 0.02, 0.5, 3.0, 10.0], np.float32)
    info = {"activation": [3, 0.0, 6.0], "int8_multiplier": 20.0}
    np.testing.assert_array_equal(ncnn_layer_reference(info, y, True),
                                  np.array([0, 0, 10, 60, 120], np.float32) / np.float32(20))
    np.testing.assert_array_equal(ncnn_layer_reference(info, y, False), np.clip(y, 0, 6))
    assert ncnn_layer_reference({"activation": [4], "int8_multiplier": None}, np.zeros(1, np.float32), True)[0] == 0.5


def test_mxnet_engine_reproduces_the_simulation(ncnn_dir, export_dir):
    """The grids re-run on plain MXNet ops under the export's profile (ncnn: multiplier, round half away;
    onnx: step, zero point, half to even; each layer's input quantized only where that layer reads it) pass
    the default gate, on an ncnn and on an ONNX export."""
    for d in (ncnn_dir, export_dir):
        rep = verify(d, "mxnet", limit=200)
        assert rep["passed"], (d, rep["breaches"])
        assert rep["agreement_sim"] == 1.0 and rep["max_error_steps"] < 1e-3, rep
        assert min(r["cosine_sim"] for r in rep["layers"]) > 0.99999


def test_engine_mismatch_is_a_clear_error(export_dir, capsys):
    capsys.readouterr()
    assert main(["verify", str(export_dir), "--engine", "ncnn", "--limit", "5"]) == 3  # bad input
    err = capsys.readouterr().err
    assert "this export was written for onnxruntime; its manifest has no ncnn model" in err
    assert "use --engine onnxruntime" in err


def test_symbol_route_verifies_from_files(tmp_path):
    """export-ncnn --symbol writes a manifest and the MXNet files; verify rebuilds the simulation from them."""
    import mxnet as mx
    from deployq.exporters.ir import mxnet_lower
    from deployq.exporters.ir.frontend import from_gluon

    qnet = deployq.quantize(get_trained("resnet20", verbose=False), profile="ncnn")
    calibrate_minmax(qnet, load_mnist5k("train").x[:100])
    sym, args, aux = mxnet_lower.to_symbol(from_gluon(qnet))
    (tmp_path / "m-symbol.json").write_text(sym.tojson())
    mx.nd.save(str(tmp_path / "m-0000.params"), {**{f"arg:{k}": v for k, v in args.items()},
                                                   **{f"aux:{k}": v for k, v in aux.items()}})
    (tmp_path / "s.json").write_text(json.dumps(deployq.export_scales(qnet, "resnet20")))
    assert main(["export-ncnn", "--symbol", str(tmp_path / "m-symbol.json"), "--params",
                 str(tmp_path / "m-0000.params"), "--scales", str(tmp_path / "s.json"), "--input-shape",
                 "1,3,32,32", "--out", str(tmp_path / "o")]) == 0
    rep = verify(tmp_path / "o", limit=200)
    assert rep["reference"] == "MXNet files + scale file" and rep["passed"], rep["breaches"]
    assert rep["agreement_sim"] == 1.0 and len(rep["layers"]) == 22
    # the rebuilt simulation is the quantized net's (same thresholds, max-abs weights): same top-1 everywhere
    from deployq.zoo import predict

    x = load_mnist5k("test").x[:200]
    ref = verify(tmp_path / "o", limit=200, layers=False)
    assert ref["accuracy"]["sim"] == float(np.mean(predict(qnet, x).argmax(1) == load_mnist5k("test").y[:200]))
    with pytest.raises(ValueError, match="--engine mxnet re-runs the records of the saved quantized net"):
        verify(tmp_path / "o", "mxnet", limit=5)
