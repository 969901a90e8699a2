"""Round trip of every shape, resize and pointwise op the IR lowers (issue 14): a small Gluon net per op,
MXNet's own output against the IR, ncnn's runtime (fp32 model) and onnxruntime (fp32 ONNX)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.ir.mxnet_lower import run
from deployq.exporters.ir.passes import optimize
from deployq.exporters.ncnn.lower import lower
from deployq.exporters.ncnn.runtime import run as ncnn_run
from deployq.exporters.ncnn.write import bin_bytes, param_text
from deployq.exporters.onnx.export import to_onnx
from mxnet import gluon, nd


class Net(gluon.HybridBlock):
    """conv -> ``body(F, y)`` -> conv, on 8 channels; ``body`` is the op under test."""

    def __init__(self, body, out_channels: int = 8):
        super().__init__()
        self.body = body
        self.c1 = gluon.nn.Conv2D(8, 3, padding=1, in_channels=3)
        self.c2 = gluon.nn.Conv2D(out_channels, 1)

    def hybrid_forward(self, F, x):
        return self.c2(self.body(F, F.relu(self.c1(x))))


def _se(F, y):
    w = F.contrib.AdaptiveAvgPooling2D(y, output_size=1).flatten()
    return F.broadcast_mul(y, F.sigmoid(w).expand_dims(axis=2).expand_dims(axis=2))


def _radix_sum(F, y):  # resnest's split attention: (N, 2C, H, W) -> (N, 2, C, H, W), softmax over the radix
    r = y.expand_dims(axis=1).reshape((0, 2, 4, 0, 0))
    p = F.contrib.AdaptiveAvgPooling2D(r.sum(axis=1), output_size=1)
    a = F.softmax(F.concat(p, 2 * p, dim=1).reshape((0, 1, 2, -1)).swapaxes(1, 2), axis=1)
    return F.broadcast_mul(r, a.reshape((0, 2, -1, 1, 1))).sum(axis=1)


CASES = {
    # name: (body, normalised IR op that must appear (None: the op itself), output channels)
    "adaptive_pool_1x1": (lambda F, y: F.contrib.AdaptiveAvgPooling2D(y, output_size=1), "Pooling"),
    "adaptive_pool_2x2": (lambda F, y: F.contrib.AdaptiveAvgPooling2D(y, output_size=2), "Pooling"),
    "squeeze_excite": (_se, "broadcast_mul"),
    "channel_shuffle": (lambda F, y: y.reshape((0, -4, 2, -1, -2)).swapaxes(1, 2).reshape((0, -3, -2)),
                        "ShuffleChannel"),
    "swapaxis": (lambda F, y: y.swapaxes(2, 3), "SwapAxis"),
    "slice_axis": (lambda F, y: F.concat(F.slice_axis(y, axis=1, begin=0, end=4),
                                         F.slice_axis(y, axis=1, begin=4, end=None) * 2, dim=1), "slice_axis"),
    "slice_shift": (lambda F, y: F.slice(F.pad(y, mode="constant", pad_width=(0, 0, 0, 0, 0, 1, 0, 1)),
                                         begin=(0, 0, 1, 1), end=(None, None, None, None)), "slice"),
    "pad_into_conv": (lambda F, y: F.pad(y, mode="constant", pad_width=(0, 0, 0, 0, 1, 1, 1, 1)), None),
    "bilinear_resize": (lambda F, y: F.contrib.BilinearResize2D(y, height=13, width=11),
                        "_contrib_BilinearResize2D"),
    "nearest_upsampling": (lambda F, y: F.UpSampling(y, scale=2, sample_type="nearest"), "UpSampling"),
    "ones_like": (lambda F, y: (F.ones_like(y) + F.sigmoid(y)) * y, "_plus_scalar"),
    "hard_swish": (lambda F, y: y * (F.clip(y + 3, 0, 6) / 6), "HardSwish"),
    "hard_sigmoid": (lambda F, y: F.clip(y + 3.0, 0, 6) / 6.0, "HardSigmoid"),
    "scalars": (lambda F, y: ((y - 0.5) * 3 + 1) / 4, "_minus_scalar"),
    "rminus_scalar": (lambda F, y: 1 - y, "_rminus_scalar"),
    "sum_keepdims": (lambda F, y: F.broadcast_add(y, y.sum(axis=2, keepdims=True)), "sum"),
    "radix_split_attention": (_radix_sum, "sum"),
}


def _net(case: str, shape: tuple[int, ...]) -> tuple[gluon.HybridBlock, np.ndarray, np.ndarray]:
    body, *_ = CASES[case]
    net = Net(body, out_channels=8)
    net.initialize()
    net.hybridize()
    x = np.random.RandomState(0).uniform(-1, 1, (2, *shape[1:])).astype(np.float32)
    return net, x, net(nd.array(x)).asnumpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.reshape(b.shape) - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_round_trip(case, tmp_path):
    shape = (1, 3, 8, 8)
    net, x, ref = _net(case, shape)
    g = optimize(from_gluon(net, shape))
    want = CASES[case][1]
    ops = {n.op for n in g.nodes}
    if want:
        assert want in ops, g.dump()
    if case == "pad_into_conv":
        assert "Pad" not in ops and g.nodes[-1].attrs["pad"] == (1, 1)
    assert _rel(run(g, x)[g.outputs[0]], ref) <= 1e-5  # the normalised IR still computes MXNet's values

    m = lower(g)
    (tmp_path / "m.param").write_text(param_text(m))
    (tmp_path / "m.bin").write_bytes(bin_bytes(m))
    assert _rel(ncnn_run(tmp_path / "m.param", tmp_path / "m.bin", x), ref) <= 1e-4

    sess = ort.InferenceSession(to_onnx(g, quantize=False).SerializeToString(), providers=["CPUExecutionProvider"])
    assert _rel(sess.run(None, {"data": x})[0], ref) <= 1e-4


def test_auxiliary_head_dropped(tmp_path):
    """A second output (a training-time auxiliary classifier) is dropped with the layers only it uses."""
    class TwoHeads(gluon.HybridBlock):
        def __init__(self):
            super().__init__()
            self.c = gluon.nn.Conv2D(4, 3, in_channels=3)
            self.main, self.aux = gluon.nn.Dense(3), gluon.nn.Dense(5)

        def hybrid_forward(self, F, x):
            y = self.c(x)
            return self.main(y), self.aux(F.relu(y))

    net = TwoHeads()
    net.initialize()
    g = from_gluon(net, (1, 3, 8, 8))
    assert len(g.outputs) == 1 and "aux" not in " ".join(n.name for n in g.nodes)
    assert len(from_gluon(net, (1, 3, 8, 8), all_outputs=True).outputs) == 2
