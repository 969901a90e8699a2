"""``deployq verify --engine tengine``: Tengine's runtime when its tools are found, else deployq's NumPy model;
the report says which ran."""

from __future__ import annotations

import numpy as np
from deployq.exporters.tengine.runtime import ENV_VARS

from deployq.verify import verify
from tests.exporters.test_tengine_kernels import kernels_export  # noqa: F401 - the fixture


def _data(tmp_path, x):
    path = tmp_path / "x.npz"
    np.savez(path, x=x[:24])
    return str(path)


def test_verify_runs_tengines_runtime(kernels_export, tengine_tools, tmp_path):  # noqa: F811
    _, _, x, d = kernels_export
    rep = verify(d, "tengine", _data(tmp_path, x), layers=False)
    assert rep["runtime"].startswith("Tengine's runtime (") and str(tengine_tools.lib) in rep["runtime"]
    assert rep["passed"] and rep["max_error_steps"] == 0.0 and rep["agreement_sim"] == 1.0


def test_verify_without_tools_runs_the_numpy_model(kernels_export, tmp_path, monkeypatch):  # noqa: F811
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    _, _, x, d = kernels_export
    rep = verify(d, "tengine", _data(tmp_path, x), layers=False)
    assert rep["runtime"].startswith("deployq's NumPy model") and "TENGINE_LIB" in rep["runtime"]
    assert rep["passed"] and rep["max_error_steps"] == 0.0
