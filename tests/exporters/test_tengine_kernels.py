"""Spec-level cases found by comparing deployq's Tengine model with Tengine's x86 runtime layer by layer
(``tengine-int8.md`` §5): the two-step dequant of the x86 conv kernels, the one-step dequant of the reference
kernel that grouped convs get, and C ``round`` on float32 quotients just below .5."""

from __future__ import annotations

import math

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.tengine import lower as tengine
from deployq.exporters.tengine.kernels import conv_kernel, two_step_dequant
from deployq.exporters.tengine.lower import round_half_away
from deployq.exporters.tengine.reference import TengineReference
from deployq.exporters.tengine.simulate import simulate
from deployq.exporters.tengine.writer import write
from mxnet import gluon
from mxnet.gluon import nn

F32 = np.float32
X256 = np.random.default_rng(4).normal(size=(256, 3, 16, 16)).astype(F32)
SEED = 3  # with these weights and images the two dequant orders differ on 3 outputs of the direct conv


def test_round_half_away_is_c_round_on_float32():
    """0.49999997f + 0.5f is 1.0f in float32: ``floor(|x| + 0.5)`` gave 1 where C ``round`` gives 0 (resnet20:
    3 of 4M conv outputs, found against Tengine's runtime)."""
    x = np.array([0.49999997, -0.49999997, 0.5, -0.5, 1.5, 2.5, -2.5, 60.499992, 126.49999, 0.0, 3.0], F32)
    want = [math.copysign(math.floor(abs(float(v)) + 0.5), float(v)) for v in x]  # float64: exact here
    assert round_half_away(x).tolist() == want
    assert round_half_away(x)[0] == 0.0


@pytest.mark.parametrize("attrs, cin, cout, kernel", [
    ({"kernel": (3, 3), "stride": (1, 1), "num_group": 1}, 8, 16, "direct"),
    ({"kernel": (3, 3), "stride": (2, 2), "num_group": 1}, 8, 16, "direct"),
    ({"kernel": (3, 3), "stride": (1, 2), "num_group": 1}, 8, 16, "im2col"),
    ({"kernel": (1, 1), "stride": (1, 1), "num_group": 1}, 8, 16, "im2col"),
    ({"kernel": (11, 11), "stride": (4, 4), "num_group": 1}, 3, 16, "im2col"),
    ({"kernel": (3, 3), "stride": (1, 1), "num_group": 8}, 8, 8, "depthwise"),
    ({"kernel": (3, 3), "stride": (2, 2), "num_group": 8}, 8, 8, "depthwise"),
    ({"kernel": (5, 5), "stride": (1, 1), "num_group": 8}, 8, 8, "ref"),
    ({"kernel": (1, 1), "stride": (1, 1), "num_group": 8}, 8, 8, "ref"),
    ({"kernel": (3, 3), "stride": (1, 1), "num_group": 4}, 16, 16, "ref"),  # resnext's grouped conv
    ({"kernel": (3, 3), "stride": (1, 1), "num_group": 1, "dilate": (2, 2)}, 8, 8, "im2col"),
])
def test_conv_kernel_selection(attrs, cin, cout, kernel):
    assert conv_kernel(attrs, cin, cout) == kernel
    assert two_step_dequant(kernel) == (kernel != "ref")


def test_depthwise_at_batch_above_one_is_the_reference_kernel():
    a = {"kernel": (3, 3), "stride": (1, 1), "num_group": 8}
    assert conv_kernel(a, 8, 8, batch=2) == "ref"
    with pytest.raises(ValueError, match="x86, arm64"):
        conv_kernel(a, 8, 8, family="riscv")


class _Kernels(gluon.HybridBlock):
    """One conv per Tengine x86 kernel: direct 3x3, im2col 1x1, depthwise 3x3, grouped 3x3 (reference kernel);
    ceil-mode padded average and max pooling."""

    def __init__(self):
        super().__init__()
        self.direct = nn.Conv2D(16, 3, padding=1, in_channels=3, activation="relu")
        self.im2col = nn.Conv2D(16, 1, in_channels=16)
        self.dw = nn.Conv2D(16, 3, padding=1, groups=16, in_channels=16)
        self.grouped = nn.Conv2D(16, 3, padding=1, groups=4, in_channels=16)
        self.avg = nn.AvgPool2D(3, 2, padding=1, ceil_mode=True)  # Tengine's caffe flavour: pads counted
        self.max = nn.MaxPool2D(3, 2, padding=1, ceil_mode=True)
        self.gap = nn.GlobalAvgPool2D()
        self.fc = nn.Dense(10)

    def hybrid_forward(self, F, x):
        y = self.im2col(self.direct(x))
        y = self.avg(y) + self.max(y)
        return self.fc(self.gap(self.grouped(self.dw(y))))


@pytest.fixture(scope="module")
def kernels_export(tmp_path_factory):
    mx.random.seed(SEED)
    net = _Kernels()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, 3, 16, 16)))
    x = np.random.default_rng(3).normal(size=(48, 3, 16, 16)).astype(F32)
    exp = tengine.lower_model(from_gluon(net, (1, 3, 16, 16), name="kernels"), [x[:16]])
    d = tmp_path_factory.mktemp("kernels")
    paths = write(exp, d)
    return exp, TengineReference(*paths[:3], input_shape=(1, 3, 16, 16)), x, d


def _codes_by_formula(ref: TengineReference, layer: str, xq: np.ndarray, two_step: bool) -> np.ndarray:
    """A conv layer's int8 output from its int8 input by the spec's arithmetic, int64 accumulation."""
    n = ref.graph.node(layer)
    a = n.attrs
    s_in = F32(ref.step(n.inputs[0]))
    q, s_w, qb = ref._weights(n, float(s_in))
    groups, (ph, pw) = a["num_group"], a["pad"]
    o, cg, kh, kw = q.shape
    xp = np.pad(xq.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    h, w = xq.shape[2:]
    acc = np.zeros((len(xq), o, h, w), np.int64)
    for c in range(o):
        g = c // (o // groups)
        for i in range(kh):
            for j in range(kw):
                acc[:, c] += np.einsum("nchw,c->nhw", xp[:, g * cg:(g + 1) * cg, i:i + h, j:j + w],
                                       q[c, :, i, j].astype(np.int64))
    acc += qb[None, :, None, None]
    sw = s_w[None, :, None, None]
    v = (acc.astype(F32) * s_in) * sw if two_step else acc.astype(F32) * (s_in * s_w)[None, :, None, None]
    if n.name in ref.fused:
        v = np.maximum(v, F32(0))
    s_out = F32(ref.step(ref.fused[n.name].output if n.name in ref.fused else n.output))
    return np.clip(round_half_away((v / s_out).astype(F32)), -127, 127).astype(np.int8)


@pytest.mark.parametrize("layer, two_step", [("direct", True), ("im2col", True), ("dw", True),
                                             ("grouped", False)])
def test_reference_conv_follows_the_kernel_that_runs(kernels_export, layer, two_step):
    _, ref, _, _ = kernels_export
    vals = ref.run_int8(X256)
    n = ref.graph.node(layer)
    out = vals[ref.fused[layer].output if layer in ref.fused else n.output]
    right = _codes_by_formula(ref, layer, vals[n.inputs[0]], two_step)
    np.testing.assert_array_equal(out, right)


def test_the_two_dequant_orders_differ_on_these_images(kernels_export):
    """The case is real: on these images the other dequant order gives other codes somewhere."""
    _, ref, _, _ = kernels_export
    vals = ref.run_int8(X256)
    differ = 0
    for layer in ("direct", "im2col", "dw", "grouped"):
        xq = vals[ref.graph.node(layer).inputs[0]]
        differ += int((_codes_by_formula(ref, layer, xq, True) != _codes_by_formula(ref, layer, xq, False)).sum())
    assert differ > 0


def test_simulation_is_bit_exact_to_reference(kernels_export):
    exp, ref, x, _ = kernels_export
    step = ref.step(ref.graph.outputs[0])
    sim = np.rint(simulate(exp, x) / step).astype(np.int64)
    out = ref.run_int8(x)[ref.graph.outputs[0]].astype(np.int64)
    np.testing.assert_array_equal(sim.reshape(out.shape), out)
