"""The Jupyter walkthroughs in notebooks/ run top to bottom (nbclient, kernel ``python3``) in a temporary working
directory, and show what they claim; the stored copies carry no outputs.

Measured on 2 shared cores, fp32 models cached: 01 0.5-0.7 min, 02 0.7-1.3 min, 03 ~0.4 min, 04 1-1.5 min.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
CELL_TIMEOUT = 600
PRIVATE = re.compile(r"\._[A-Za-z]|\bimport\s+_|\bimport\s+\(?[\w, ]*\b_[A-Za-z]|^\s*(from|import)\s+tests\b", re.M)


def _text(nb: nbformat.NotebookNode) -> str:
    """All stream and text/plain outputs of the executed notebook, in order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/markdown", "") or out["data"].get("text/plain", ""))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def _percent(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"not in the notebook's output: {pattern!r}"
    return float(m.group(1))


def test_four_notebooks_stored_without_outputs() -> None:
    assert NAMES == ["01_simulate_strategies", "02_qat_to_ncnn", "03_export_tengine", "04_onnx_and_sensitivity"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3", path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: stored outputs"
            # the public API only: no private names (``x._y``, ``import _y``), nothing from the test suite
            assert not PRIVATE.search(cell.source), f"{path.name}: {PRIVATE.search(cell.source).group(0)!r}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.setenv("MXNET_SUBGRAPH_VERBOSE", "0")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    # the kernel is this interpreter (jupyter_client maps the spec's "python" to sys.executable); its
    # `deployq` command sits next to it
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _text(nb)
    assert "Traceback" not in text
    assert (tmp_path / "outputs" / path.stem).is_dir()  # it wrote under its own folder of the working directory

    if path.stem == "01_simulate_strategies":
        fp32 = [float(v) for v in re.findall(r"fp32 top-1: ([\d.]+)%", text)]  # mobilenet0.25, resnet20
        base = _percent(r"\| offline \(baseline\) \|[^\n]*\| ([\d.]+)% \|", text)  # mobilenet0.25 table
        r_base = _percent(r"\| int8 \| yes \| int8 \| channel \| no \| no \| ([\d.]+)%", text)  # resnet20
        r_uint8 = _percent(r"\| uint8 \| yes \| int8 \| channel \| no \| no \| ([\d.]+)%", text)
        assert len(fp32) == 2 and base >= fp32[0] - 1.0 and r_base >= fp32[1] - 1.0, (fp32, base, r_base)
        assert r_uint8 < r_base - 20, (r_base, r_uint8)
        assert "all checks hold" in text and _images(nb) >= 1
    elif path.stem == "02_qat_to_ncnn":
        assert _percent(r"top-1 agreement ncnn vs simulation: ([\d.]+)%", text) >= 99.0
        assert "passed: True" in text
        assert _images(nb) >= 1
    elif path.stem == "03_export_tengine":
        assert "bit-identical: True" in text and "integer codes recovered" in text
    elif path.stem == "04_onnx_and_sensitivity":
        assert text.count("PASSED") >= 2
        assert _percent(r"optimizations off\s+top-1 [\d.]+%  agreement with the simulation ([\d.]+)%", text) >= 99.0
        assert re.search(r"fp32 \(no QDQ\): \[", text)
        assert _images(nb) >= 1
