"""deployq's Tengine exports (export-tengine -> x86 convert_tool + quant_tool_int8 -f <deployq table>) in Tengine's
aarch64 build under qemu-user: against deployq's arm64 kernel family model (``exporters/tengine/arm64.py``) and
the x86 simulation, and the layers that build miscomputes or crashes on (``kernels.arm64_problem``).

Measured (MNIST-5k test images, qemu ``max`` and ``cortex-a53``): the portable reference kernels
(``TG_DEBUG_REF=1``) equal the x86 simulation; the default NEON/assembly kernels equal the arm64 model. Skipped
unless ``TENGINE_ARM_RUNNER`` (``bash tests/engines/arm/build.sh``), qemu-aarch64 and the x86 Tengine tools
(``../shared/engines/build.sh``) exist."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.tengine.arm64 import Arm64TengineReference, arm64_problems, find_arm_runner, run_arm_runner
from deployq.exporters.tengine.cli import export_tengine
from deployq.exporters.tengine.runtime import build_int8_tmfile, export_files
from mxnet.gluon import nn

from deployq.cli import main
from deployq.data import load_mnist5k
from deployq.manifest import read_manifest
from deployq.verify import tengine_reference

N_IMAGES = 24


@pytest.fixture(scope="module")
def arm_runner() -> list[str]:
    cmd, why = find_arm_runner()
    if cmd is None:
        pytest.skip(f"Tengine's aarch64 runner not available: {why}")
    return cmd


@pytest.fixture(scope="module")
def exports(tengine_tools, arm_runner, tmp_path_factory) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """model -> (int8 tmfile, images, deployq's x86 simulation's int8 output codes)."""
    root = tmp_path_factory.mktemp("arm-tengine")
    x = load_mnist5k("test").x[::25][:N_IMAGES]
    res = {}
    for model in ("resnet20", "mobilenet0.25"):
        out = root / model
        assert main(["export-tengine", model, "--out", str(out)]) == 0
        ref = tengine_reference(read_manifest(out), x)
        sim = np.rint(ref.sim.reshape(len(x), -1) / ref.output_step).astype(np.int64)
        res[model] = (build_int8_tmfile(out, root / f"{model}-int8.tmfile", tengine_tools), x, sim)
    return res


def _model_codes(export_dir: Path, x: np.ndarray) -> np.ndarray:
    m = Arm64TengineReference(*export_files(export_dir))
    return m.run_int8(x)[m.graph.outputs[0]].reshape(len(x), -1).astype(np.int64)


@pytest.mark.parametrize("model", ["resnet20", "mobilenet0.25"])
def test_arm_reference_kernels_equal_x86_simulation(model, arm_runner, exports):
    tm, x, sim = exports[model]
    codes, _ = run_arm_runner(arm_runner, tm, x, reference_kernels=True)
    np.testing.assert_array_equal(codes.astype(np.int64), sim)


@pytest.mark.parametrize("cpu", [None, "cortex-a53"])
def test_arm_resnet20_bit_identical_to_arm64_model(cpu, arm_runner, exports):
    """The NEON/assembly kernels (fixed-point requantization) equal deployq's arm64 model on every image; they
    are up to 2 codes from the x86 simulation, never in the top-1."""
    tm, x, sim = exports["resnet20"]
    codes = run_arm_runner(arm_runner, tm, x, cpu=cpu)[0].astype(np.int64)
    np.testing.assert_array_equal(codes, _model_codes(tm.parent / "resnet20", x))
    assert 0 < np.abs(codes - sim).max() <= 2
    assert (codes.argmax(1) == sim.argmax(1)).all()


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="Tengine bug: dw_k3s2p1_int8_a72.S computes (out_w-2)>>2 unsigned, so a 1-wide output "
                   "(mobilenet0.25's last stride-2 depthwise, 2x2 -> 1x1) loops over memory until SIGSEGV")
def test_arm_mobilenet_runs(arm_runner, exports):
    tm, x, _ = exports["mobilenet0.25"]
    assert [k for k, _ in arm64_problems(Arm64TengineReference(*export_files(tm.parent / "mobilenet0.25")).graph)] \
        == ["features.0", "features.69", "features.75"]  # the 8-channel conv, the 1-wide depthwise convs
    run_arm_runner(arm_runner, tm, x[:1])


def _conv_net(channels: int, kernel: int, stride: int, pad: int, depthwise: bool) -> nn.HybridSequential:
    mx.random.seed(0)
    n = nn.HybridSequential()
    n.add(nn.Conv2D(16, 3, padding=1, in_channels=3), nn.Activation("relu"))
    n.add(nn.Conv2D(channels, kernel, strides=stride, padding=pad, groups=16 if depthwise else 1, in_channels=16))
    n.add(nn.Conv2D(16, 1, in_channels=channels))
    n.initialize(mx.init.Xavier())
    return n


@pytest.mark.parametrize("channels, kernel, stride, pad, dw, hw", [
    (16, 3, 1, 1, True, (8, 8)), (16, 3, 2, 1, True, (7, 7)), (16, 3, 2, 1, True, (7, 9)),
    (16, 3, 2, 1, True, (8, 7)), (16, 3, 2, 1, True, (2, 8)), (16, 3, 2, 1, True, (8, 2)),
    (16, 5, 1, 2, True, (8, 8)), (16, 1, 1, 0, True, (8, 8)), (32, 3, 1, 1, False, (8, 8)),
    (24, 3, 1, 1, False, (8, 8)),
])
def test_arm64_problems_predict_the_aarch64_build(channels, kernel, stride, pad, dw, hw, tengine_tools, arm_runner,
                                                   tmp_path):
    """Where :func:`arm64_problems` finds nothing, the emulated build equals the arm64 model on every output;
    where it names the layer, the build crashes or miscomputes (this is how each rule was found)."""
    rng = np.random.default_rng(0)
    g = from_gluon(_conv_net(channels, kernel, stride, pad, dw), (1, 3, *hw), name="c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_tengine(g, tmp_path, "c", [rng.normal(size=(32, 3, *hw)).astype(np.float32)])
    x = rng.normal(size=(4, 3, *hw)).astype(np.float32)
    model = Arm64TengineReference(*export_files(tmp_path))
    problems = arm64_problems(model.graph)
    tm = build_int8_tmfile(tmp_path, tmp_path / "c.tmfile", tengine_tools)
    want = _model_codes(tmp_path, x)
    try:
        got = run_arm_runner(arm_runner, tm, x)[0].astype(np.int64)
    except RuntimeError:
        assert problems and "crash" in problems[0][1]
        return
    if problems:
        assert (got != want).any(), problems
    else:
        np.testing.assert_array_equal(got, want)


def test_verify_arm64_runs_the_emulated_build(tengine_tools, arm_runner, tmp_path, capsys):
    """``export-tengine --kernels arm64`` + ``deployq verify``: the emulated aarch64 runtime, bit-identical to
    the arm64 simulation."""
    out = tmp_path / "r20"
    assert main(["export-tengine", "resnet20", "--kernels", "arm64", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--limit", "16", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kernels"] == "arm64" and "aarch64 runtime under qemu" in rep["runtime"]
    assert rep["max_error_steps"] == 0 and rep["agreement_sim"] == 1.0 and rep["images"] == 16
    assert 1 <= rep["vs_x86_simulation"]["max_codes"] <= 2
