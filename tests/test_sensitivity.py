"""Sensitivity ranking, reports and the fp32 fallback (honoured by the ONNX exporter)."""

from __future__ import annotations

import json

import onnx
import pytest
from deployq.exporters.onnx.export import export_qnet

import deployq
from deployq.data import load_mnist5k
from deployq.layerwise import calibrate_minmax
from deployq.sensitivity import analyse, config_keeping_fp32, write_report
from deployq.zoo import get_trained

LAYERS = ["features.0", "features.2.0.body.0", "features.4.2.body.3", "output"]


@pytest.fixture(scope="module")
def report():
    tr, te = load_mnist5k("train"), load_mnist5k("test")
    return analyse(lambda: get_trained("resnet20", verbose=False), tr.x[:200], te.x[:200], te.y[:200],
                   layers=LAYERS, target_drop=0.0)


def test_ranking(report):
    rows = report["layers"]
    assert sorted(r["layer"] for r in rows) == sorted(LAYERS)
    sq = [r["only_quantized"]["sqnr_db"] for r in rows]
    assert sq == sorted(sq) and all(10 < s < 80 for s in sq)
    # quantizing one layer is closer to fp32 than quantizing all
    assert min(sq) >= report["all_quantized"]["sqnr_db"]
    assert all(r["only_fp32"]["sqnr_db"] >= report["all_quantized"]["sqnr_db"] - 3 for r in rows)


def test_fallback_and_files(report, tmp_path):
    fb = report["fallback"]
    assert fb["config_list"] == config_keeping_fp32(fb["fp32_layers"])
    files = write_report(report, tmp_path, "resnet20")
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files["html"].read_text()
    assert all(k in html for k in LAYERS)
    assert json.loads(files["config"].read_text()) == fb["config_list"]


def test_fallback_config_gives_no_qdq(tmp_path):
    cfg = config_keeping_fp32(["features.0", "output"])
    qnet = deployq.quantize(get_trained("resnet20", verbose=False), cfg, profile="onnx")
    calibrate_minmax(qnet, load_mnist5k("train").x[:100])
    m = onnx.load(str(export_qnet(qnet, tmp_path, "resnet20", fp32=False)["model"]))
    fp32_nodes = [n for n in m.graph.node if n.name in ("features.0", "output")]
    assert len(fp32_nodes) == 2 and all(not i.endswith(".dq") for n in fp32_nodes for i in n.input)
    assert sum(n.op_type == "Conv" and n.input[1].endswith(".dq") for n in m.graph.node) == 20


def test_unknown_layer():
    x = load_mnist5k("test").x[:10]
    with pytest.raises(ValueError, match="unknown layer"):
        analyse(lambda: get_trained("resnet20", verbose=False), x, x, layers=["nope"])
