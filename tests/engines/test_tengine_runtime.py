"""deployq's Tengine exports through Tengine's convert_tool + quant_tool_int8 (with deployq's scale table) and
run in Tengine's x86 runtime: bit-identical int8 codes to deployq's NumPy model (every layer) and simulation."""

from __future__ import annotations

import numpy as np
import pytest
from deployq.exporters.tengine.runtime import TengineGraph, build_int8_tmfile, export_files

from tests.exporters.test_tengine_kernels import kernels_export  # noqa: F401 - the fixture


def test_every_layer_bit_identical(kernels_export, tengine_tools, tmp_path):  # noqa: F811
    """Direct 3x3, im2col 1x1, depthwise 3x3 and grouped (reference-kernel) convs, global pooling, FC: every
    Tengine tensor's codes equal deployq's NumPy model's on 48 images."""
    _, ref, x, d = kernels_export
    tm = build_int8_tmfile(d, tmp_path / "k-int8.tmfile", tengine_tools)
    vals = ref.run_int8(x)
    with TengineGraph(tm, (1, 3, 16, 16), tengine_tools.lib, keep_all=True) as g:
        runs = [g.run_codes(g.quantize_input(x[i:i + 1])) for i in range(len(x))]
    compared = 0
    for n in ref.graph.nodes:
        tg = ref.name_of[n.output]
        if tg in runs[0]:
            got = np.concatenate([r[tg] for r in runs])
            np.testing.assert_array_equal(got, vals[n.output].reshape(got.shape), err_msg=f"layer {n.name}")
            compared += 1
    assert compared >= 6


@pytest.mark.parametrize("model", ["resnet20", "mobilenet0.25"])
def test_builtin_model_bit_identical_to_simulation(model, tengine_tools, tmp_path):
    """export-tengine -> convert_tool -> quant_tool_int8 -f <deployq table> -> Tengine: the int8 logits equal
    deployq's simulation of the export on 64 MNIST-5k test images (all of them, top-1 too)."""
    from deployq.cli import main
    from deployq.data import load_mnist5k
    from deployq.manifest import read_manifest
    from deployq.verify import tengine_reference

    out = tmp_path / model
    assert main(["export-tengine", model, "--out", str(out)]) == 0
    x = load_mnist5k("test").x[::16][:64]
    ref = tengine_reference(read_manifest(out), x)
    sim = np.rint(ref.sim.reshape(len(x), -1) / ref.output_step).astype(np.int64)
    tm = build_int8_tmfile(out, tmp_path / "int8.tmfile", tengine_tools)
    with TengineGraph(tm, export_files(out)[3], tengine_tools.lib) as g:
        assert g.out_step == pytest.approx(ref.output_step, rel=1e-6)
        codes = g.outputs(x).reshape(len(x), -1).astype(np.int64)
    identical = np.all(codes == sim, axis=1)
    assert identical.mean() >= 0.999, f"{(~identical).sum()} of {len(x)} images differ"
    assert (codes.argmax(1) == sim.argmax(1)).all()
