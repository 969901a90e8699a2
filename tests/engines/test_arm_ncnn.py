"""deployq's int8 ncnn exports in ncnn's aarch64 build (NEON kernels, run under qemu-user): the logits equal
ncnn's x86 runtime bit for bit (packing layout off, as ``deployq verify`` runs it), with packing on (ARM's
default path) and off, on qemu's ``max`` CPU (dotprod/i8mm kernels) and on a plain ARMv8.0 ``cortex-a53``.
Skipped unless ``NCNN_ARM_RUNNER`` (``bash tests/engines/arm/build.sh`` prints it) and qemu-aarch64 exist."""

from __future__ import annotations

import numpy as np
import pytest
from deployq.exporters.ncnn.export import balanced_images, export_qnet, minmax_calibrate
from deployq.exporters.ncnn.runtime import run

import deployq
from deployq.data import load_mnist5k
from deployq.zoo import get_trained, predict
from tests.engines.arm.qemu import find_runner, run_arm


@pytest.fixture(scope="module")
def arm_runner() -> list[str]:
    cmd, why = find_runner()
    if cmd is None:
        pytest.skip(f"ncnn's aarch64 runner not available: {why}")
    return cmd


@pytest.mark.parametrize("name", ["resnet20", "mobilenet0.25"])
def test_arm_ncnn_int8_equals_x86_runtime(name, arm_runner, tmp_path):
    net = get_trained(name, verbose=False)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, balanced_images(10))
    files = export_qnet(net, tmp_path, name)
    x = load_mnist5k("test").x[::25][:40]
    x86 = run(files["int8_param"], files["int8_bin"], x, packing=False)
    sim = predict(net, x)
    assert np.mean(x86.argmax(1) == sim.argmax(1)) == 1.0
    for packing, cpu in ((True, None), (False, None), (True, "cortex-a53")):
        arm = run_arm(arm_runner, files["int8_param"], files["int8_bin"], x, packing=packing, cpu=cpu)
        assert arm.shape == x86.shape
        np.testing.assert_array_equal(arm, x86, err_msg=f"{name}: packing={packing} cpu={cpu or 'max'}")
