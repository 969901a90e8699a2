"""``deployq demo`` end to end (short QAT), and the saved QAT net reloads to the same accuracy.

Measured (mobilenet0.25, ncnn profile, 2 cores): fp32 88.8 %; QAT int8 after the demo's 2 epochs (fake BN with
frozen statistics, cosine lr from 1e-3): 88.8 %; the int8 model in ncnn agrees with the simulation on 100 %. The
test runs a quarter epoch (~30 s).
"""

from __future__ import annotations

import json

import deployq
from deployq.data import load_mnist5k
from deployq.demo import run_demo
from deployq.zoo import evaluate


def test_demo_short_qat(tmp_path, capsys) -> None:
    r = run_demo(qat_epochs=0.25, out=tmp_path, quiet=True)
    out = capsys.readouterr().out
    assert "[ncnn] int8 model in ncnn's runtime" in out
    assert r["fp32_top1"] > 0.85
    assert r["ptq_top1"] >= r["fp32_top1"] - 0.02, r
    assert r["qat_top1"] >= r["fp32_top1"] - 0.03, r
    assert json.loads((tmp_path / "demo.json").read_text())["qat_top1"] == r["qat_top1"]
    assert r["ncnn"]["agreement"] == 1.0  # ncnn's int8 runtime picks the simulation's top-1 on all 1000 images
    assert abs(r["ncnn"]["accuracy"] - r["qat_top1"]) < 1e-9
    qnet = deployq.load(tmp_path / "mobilenet0.25-qat")
    assert deployq.describe(qnet).startswith("profile=ncnn")
    assert abs(evaluate(qnet, load_mnist5k("test")) - r["qat_top1"]) < 1e-9
