"""``deployq demo`` end to end (short QAT), and the saved QAT net reloads to the same accuracy.

Measured (mobilenet0.25, ncnn profile, 2 cores): fp32 89.30 %, PTQ int8 89.60 %, QAT int8 after 1 epoch
88.60-89.00 % for lr 0 .. 0.05 (lr 0 gives 88.60 %: the drop comes from re-tracking ranges / fake-BN statistics
in training mode, not from the weight updates). ~25 s.
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
    assert "ncnn" in out  # the lead's ncnn hook reports either way
    assert r["fp32_top1"] > 0.85
    assert r["ptq_top1"] >= r["fp32_top1"] - 0.02, r
    assert r["qat_top1"] >= r["fp32_top1"] - 0.03, r
    assert json.loads((tmp_path / "demo.json").read_text())["qat_top1"] == r["qat_top1"]
    qnet = deployq.load(tmp_path / "mobilenet0_25-qat")
    assert deployq.describe(qnet).startswith("profile=ncnn")
    assert abs(evaluate(qnet, load_mnist5k("test")) - r["qat_top1"]) < 1e-9
