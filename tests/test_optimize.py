"""``deployq optimize``: the pipeline from Python and the command line; an AdaRound-optimized net exports to ncnn
and ncnn's own runtime (PyPI ``ncnn``) computes what deployq simulated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from deployq.calib.ptq import AdaRoundConfig
from deployq.calib.ptq.pipeline import optimize

import deployq
from deployq.cli import main
from deployq.data import load_mnist5k
from deployq.zoo import get_trained, predict


@pytest.fixture(scope="module")
def data():
    tr, te = load_mnist5k("train"), load_mnist5k("test")
    rng = np.random.default_rng(1)
    iv = rng.choice(len(te.x), 300, replace=False)
    return tr.x[rng.choice(len(tr.x), 64, replace=False)], te.x[iv], te.y[iv]


def test_adarounded_net_verifies_in_ncnns_runtime(data, tmp_path):
    """optimize's adaround step (scored), then the same pipeline's net exported: ncnn agrees on every image."""
    pytest.importorskip("ncnn")
    from deployq.calib.ptq.pipeline import build
    from deployq.exporters.ncnn.runtime import export_and_run

    xc, xv, yv = data
    cfg = AdaRoundConfig(iters=10, batch_size=16)
    res = optimize(lambda: get_trained("resnet20", verbose=False), xc, xv, yv, target_drop=-1.0, methods=("kl",),
                   steps=("adaround",), adaround_config=cfg, quiet=True)
    assert [s.step for s in res.steps] == ["calibrate:kl", "adaround"] and not res.met
    ada = res.steps[1]
    assert ada.detail["adaround_seconds"] > 0
    net, _ = build(get_trained("resnet20", verbose=False), xc, "ncnn", None, "kl", ada=cfg)
    assert float(np.mean(predict(net, xv).argmax(1) == yv)) == ada.accuracy  # the same pipeline, deterministic
    r = export_and_run(net, tmp_path / "ncnn", xv, yv, "resnet20")
    assert r["agreement"] == 1.0
    assert r["accuracy"] >= 0.9


def test_optimize_stops_at_the_first_step_meeting_the_target(data):
    xc, xv, yv = data
    res = optimize(lambda: get_trained("resnet20", verbose=False), xc, xv, yv, target_drop=0.05,
                   methods=("minmax", "kl"), quiet=True)
    assert res.met and [s.step for s in res.steps] == ["calibrate:minmax"] and res.chosen == "calibrate:minmax"
    acc = float(np.mean(predict(res.net, xv).argmax(1) == yv))
    assert acc == res.steps[0].accuracy and res.fp32_accuracy - acc <= 0.05


def test_cli_writes_a_net_that_reloads(tmp_path, capsys):
    out = tmp_path / "opt"
    rc = main(["optimize", "--model", "resnet20", "--target-drop", "0.05", "--methods", "minmax", "--images", "100",
               "--calib-images", "32", "--quiet", "--json", "-o", str(out)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["met"] and doc["chosen"] == "calibrate:minmax" and doc["steps"][0]["accuracy"] > 0.9
    net = deployq.load(out)
    x = load_mnist5k("test").x[:50]
    assert deployq.quant_layers(net)
    assert np.isfinite(predict(net, x)).all()


def test_cli_bad_step_is_a_usage_error(tmp_path, capsys):
    rc = main(["optimize", "--model", "resnet20", "--target-drop", "0.01", "--steps", "calibrate,gptq", "-o",
               str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "gptq" in err and "brecq" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
