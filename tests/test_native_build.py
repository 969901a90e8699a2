"""The native libraries are the ones the install built next to the package (deployq/native/*.so, build key
checked), and without them deployq's fallback computes the same numbers.

The fallback runs in a child process whose ``deployq.native.build.HERE`` is an empty folder: the state of an
install without a compiler (the libraries of this process are loaded and cannot be unloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import calibrate
from mxnet import autograd

import deployq
import deployq.native
from deployq.native import build, calibops, rawstats

from .test_core import small_net

ROOT = Path(__file__).resolve().parent.parent
MAPS = Path("/proc/self/maps")


def _mapped_libraries() -> set[Path]:
    """deployq's native libraries mapped into this process."""
    return {Path(line.split()[-1]) for line in MAPS.read_text().splitlines() if "libdeployq_" in line}


@pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler: the install built no native library")
@pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps")
def test_the_installed_libraries_are_loaded():
    problems = {lib.stem: deployq.native.library_problem(lib) for lib in build.LIBRARIES}
    assert all(p is None for p in problems.values()), f"{problems}: run python -m deployq.native"
    assert deployq.native.available() and calibops.available() and rawstats.load() is not None
    here = Path(deployq.native.__file__).resolve().parent
    expect = {here / f"{lib.stem}.so" for lib in build.LIBRARIES}
    assert expect == {p.resolve() for p in _mapped_libraries()}  # these, and none from elsewhere (an old cache)


def compute() -> dict:
    """A small job through every native part: a QAT training forward + backward (fake-quant operators), the
    inference output after it, and a calibration (in-graph statistics and the in-place reader)."""
    net = small_net(7)
    deployq.quantize(net, [{"op_types": ["Conv2D", "Dense"], "fake_bn": False}], "ncnn", "qat")
    net.hybridize(static_alloc=True)
    x = mx.nd.array(np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    x.attach_grad()
    with autograd.record():
        train = net(x)
    train.backward()
    data = np.random.default_rng(1).standard_normal((24, 3, 8, 8)).astype(np.float32)
    scales = calibrate(small_net(8), data, method="minmax", profile="ncnn", quiet=True, batch_size=8)
    return {"native": deployq.native.available(), "train": train.asnumpy().tolist(),
            "grad": x.grad.asnumpy().tolist(), "eval": net(x).asnumpy().tolist(),
            "scales": scales.to_dict()["tensors"]}


_CHILD = """
import json, sys, tempfile
from pathlib import Path
from deployq.native import build
build.HERE = Path(tempfile.mkdtemp())  # an install without the libraries
from tests.test_native_build import compute
json.dump(compute(), open(sys.argv[1], "w"))
"""


@pytest.mark.skipif(not deployq.native.available(), reason="no native libraries: nothing to compare the fallback to")
def test_the_fallback_gives_the_same_numbers(tmp_path):
    out = tmp_path / "fallback.json"
    res = subprocess.run([sys.executable, "-c", _CHILD, str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("deployq:")]
    assert len(lines) == 1 and "not built" in lines[0] and "python -m deployq.native" in lines[0], res.stderr
    got, ref = json.loads(out.read_text()), compute()
    assert not got["native"] and ref["native"]
    np.testing.assert_array_equal(got["train"], ref["train"])  # bit-identical forward
    np.testing.assert_array_equal(got["eval"], ref["eval"])
    # gradients: MXNet computes g * s / s through the STE, the fused operator g (tests/test_native.py)
    np.testing.assert_allclose(got["grad"], ref["grad"], rtol=1e-5, atol=1e-7)
    assert ref["scales"] and got["scales"] == ref["scales"]
