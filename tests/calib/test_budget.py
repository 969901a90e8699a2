"""The reconstruction's time budget (``deployq.calib.ptq.budget``): the arithmetic of the iterations per unit,
and AdaRound / the optimize command keeping to a budget far below what the configured iterations take."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from deployq.calib.ptq import AdaRoundConfig, adaround
from deployq.calib.ptq import budget as bmod
from deployq.calib.ptq.budget import Budget

import deployq
from deployq.cli import main
from deployq.data import load_mnist5k
from deployq.layerwise import calibrate_minmax
from deployq.zoo import get_trained


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_iterations_fill_the_time_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bmod.time, "perf_counter", clock)
    b = Budget(100.0, max_iters=1000, min_iters=10)
    b.probed([0.1, 0.1, 0.2])
    b.advanced(0, 1.0, first=True)  # 1 s to advance over a unit of 0.1 s per iteration: 10 s per such second
    clock.t = 1.0
    # left = 100 - 1 - 10 * (0.4 - 0.05) = 95.5 s for units of 0.1 + 0.1 + 0.2 s per iteration: 238 each
    assert b.iters_for(0) == 238
    clock.t = 100.0  # nothing left: the floor
    assert b.iters_for(1) == 10
    assert b.report()["iters"] == [238, 10]
    b2 = Budget(1e6, max_iters=300)
    b2.probed([0.5])
    assert b2.iters_for(0) == 300  # the configured iterations cap it
    with pytest.raises(ValueError, match="time budget"):
        Budget(0, 10)
    with pytest.raises(ValueError, match="time_budget"):
        AdaRoundConfig(time_budget=-1)


def test_adaround_keeps_to_its_budget():
    tr = load_mnist5k("train")
    xc = tr.x[np.random.default_rng(0).choice(len(tr.x), 64, replace=False)]
    net = deployq.quantize(get_trained("resnet20", verbose=False), profile="ncnn")
    calibrate_minmax(net, xc)
    t = time.perf_counter()
    rep = adaround(net, xc, AdaRoundConfig(iters=5000, batch_size=16, time_budget=15.0))
    wall = time.perf_counter() - t
    its = [u["iters"] for u in rep["units"]]
    assert rep["budget"]["iters"] == its and len(its) == len(deployq.quant_layers(net))
    assert all(10 <= n < 5000 for n in its)
    # at the budget (the estimate errs by a few iterations per unit), far below 5000 iterations per layer
    assert wall < 15.0 * 1.3 + 3, (wall, its)
    assert rep["seconds"] > 15.0 * 0.6, (rep["seconds"], its)  # the budget is used, not skipped
    assert max(its[:-1]) - min(its[:-1]) <= 0.5 * max(its), its  # about the same for every unit


def test_cli_time_budget(tmp_path, capsys):
    rc = main(["optimize", "--model", "resnet20", "--target-drop", "-1", "--methods", "minmax", "--steps",
               "adaround", "--images", "100", "--calib-images", "32", "--adaround-iters", "5000",
               "--time-budget", "0.2", "--quiet", "--json", "-o", str(tmp_path / "opt")])
    assert rc == 4  # a negative drop is never met; the best net is still written
    doc = json.loads(capsys.readouterr().out)
    step = doc["steps"][1]
    assert step["step"] == "adaround" and all(10 <= n < 5000 for n in step["detail"]["iters"])
    assert step["detail"]["adaround_seconds"] < 12 * 1.3 + 3
    rc = main(["optimize", "--model", "resnet20", "--target-drop", "0.01", "--time-budget", "-1", "-o",
               str(tmp_path / "x")])
    assert rc == 2 and "--time-budget" in capsys.readouterr().err
