"""The ops deployq writes for Tengine in place of those its converter lacks (``exporters/tengine/rewrite.py``),
through Tengine's convert_tool + quant_tool_int8 (deployq's scale table) and run in Tengine's x86 runtime: every
tensor's int8 codes equal deployq's NumPy model of the kernels, per op, on 16 images."""

from __future__ import annotations

import numpy as np
import pytest
from deployq.exporters.tengine.reference import TengineReference
from deployq.exporters.tengine.runtime import TengineGraph, build_int8_tmfile

from tests.exporters.test_tengine_shape_ops import CASES, SHAPE, export, images


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_bit_identical_in_tengine(op, tengine_tools, tmp_path):
    _, _, paths = export(op, tmp_path / "export")
    ref = TengineReference(*paths[:3], input_shape=SHAPE)
    x = images(16, seed=3)
    vals = ref.run_int8(x)
    tm = build_int8_tmfile(tmp_path / "export", tmp_path / "int8.tmfile", tengine_tools)
    with TengineGraph(tm, SHAPE, tengine_tools.lib, keep_all=True) as g:
        runs = [g.run_codes(g.quantize_input(x[i:i + 1])) for i in range(len(x))]
    compared = []
    for n in ref.graph.nodes:
        tg = ref.name_of[n.output]
        if tg in runs[0] and n.name not in {f.name for f in ref.fused.values()}:
            got = np.concatenate([r[tg] for r in runs])
            np.testing.assert_array_equal(got.reshape(vals[n.output].shape), vals[n.output],
                                          err_msg=f"{op}: layer {n.name} ({n.op})")
            compared.append(n.op)
    out = np.concatenate([r[""] for r in runs])
    np.testing.assert_array_equal(out.reshape(len(x), -1), vals[ref.graph.outputs[0]].reshape(len(x), -1))
    assert CASES[op][1] in compared
