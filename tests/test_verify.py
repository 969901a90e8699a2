"""deployq verify: onnxruntime export vs simulation, thresholds as a CI gate, JSON, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from deployq.exporters.onnx_export import export_qnet

import deployq
from deployq.cli import main
from deployq.data import load_mnist5k
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
    assert main(["verify", str(export_dir), "--limit", "50", "--no-layers", "--max-error-steps", "0"]) == 3
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
    with pytest.raises(ValueError, match="builtin"):
        load_data("nonsense", (1, 3, 32, 32))
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_data(str(tmp_path / "bad.npz"), (1, 3, 32, 32))
    assert main(["verify", str(tmp_path)]) == 1


def test_ncnn_export_verifies_in_ncnn(tmp_path):
    """export-ncnn writes the manifest; `deployq verify` runs the int8 model in ncnn's runtime."""
    from deployq.exporters.ncnn_export import export_qnet as export_ncnn

    qnet = deployq.quantize(get_trained("resnet20", verbose=False), profile="ncnn")
    calibrate_minmax(qnet, load_mnist5k("train").x[:200])
    export_ncnn(qnet, tmp_path, "resnet20")
    rep = verify(tmp_path, limit=200)
    assert rep["engine"] == "ncnn" and rep["agreement_sim"] == 1.0, rep
    assert rep["mean_error_steps"] < 0.05, rep
