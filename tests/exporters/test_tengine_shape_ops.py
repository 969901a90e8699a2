"""Ops Tengine's converter lacks, written as ops it runs in int8 (``exporters/tengine/rewrite.py``): per op a tiny
net whose MXNet simulation equals deployq's NumPy model of Tengine's kernels code for code, and whose written
json/params compute the net's fp32 function in MXNet (weights placed on Tengine's int8 grid beforehand)."""

from __future__ import annotations

from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.tengine import lower as tengine
from deployq.exporters.tengine.reference import TengineReference
from deployq.exporters.tengine.simulate import simulate
from deployq.exporters.tengine.writer import write
from mxnet import gluon
from mxnet.gluon import nn

SHAPE = (1, 3, 8, 8)


class _SE(gluon.HybridBlock):
    """conv, squeeze-excitation (global pool, Dense, ReLU, Dense, sigmoid, expand_dims) and broadcast_mul."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(8, 3, padding=1, in_channels=3)
        self.fc1, self.fc2 = nn.Dense(4, in_units=8), nn.Dense(8, in_units=4)

    def hybrid_forward(self, F, x):
        y = F.Activation(self.conv(x), act_type="relu")
        w = F.sigmoid(self.fc2(F.relu(self.fc1(F.contrib.AdaptiveAvgPooling2D(y, output_size=1)))))
        return F.broadcast_mul(y, w.expand_dims(axis=2).expand_dims(axis=2))


class _Upsample(gluon.HybridBlock):
    """hrnet's fuse: a strided branch upsampled (nearest) and added to the full-resolution branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2D(6, 3, padding=1, in_channels=3), nn.Conv2D(6, 3, 2, 1, in_channels=3)

    def hybrid_forward(self, F, x):
        return F.relu(F.broadcast_add(self.a(x), F.UpSampling(self.b(x), scale=2, sample_type="nearest")))


class _Shuffle(gluon.HybridBlock):
    """shufflenet: a channel shuffle, and (v2) a shuffle split in two halves, one half through a conv."""

    def __init__(self, split: bool):
        super().__init__()
        self.split = split
        self.conv = nn.Conv2D(12, 1, in_channels=3)
        self.pw = nn.Conv2D(6, 1, in_channels=6)

    def hybrid_forward(self, F, x):
        y = F.relu(self.conv(x))
        y = F.reshape(F.swapaxes(F.reshape(y, (0, -4, 3, -1, -2)), 1, 2), (0, -3, -2))
        if not self.split:
            return y
        a, b = F.slice_axis(y, axis=1, begin=0, end=6), F.slice_axis(y, axis=1, begin=6, end=12)
        return F.concat(a, F.relu(self.pw(b)), dim=1)


class _HardSwish(gluon.HybridBlock):
    """mobilenetv3: hard-swish after a conv and a hard-sigmoid gate (SE) on a 1x1 map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(8, 3, padding=1, in_channels=3)
        self.se = nn.Conv2D(8, 1, in_channels=8)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        y = y * (F.clip(y + 3, 0, 6) / 6)
        g = F.clip(self.se(F.contrib.AdaptiveAvgPooling2D(y, output_size=1)) + 3, 0, 6) / 6
        return F.broadcast_mul(y, g)


class _AvgPoolPad(gluon.HybridBlock):
    """Padded average pooling counting the pads (MXNet's default), stride 1 (inceptionv3) and 2 (shufflenet_v1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(6, 3, padding=1, in_channels=3)

    def hybrid_forward(self, F, x):
        y = F.relu(self.conv(x))
        return F.concat(F.Pooling(F.Pooling(y, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="avg"),
                                  kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="avg"),
                        F.Pooling(y, kernel=(2, 2), stride=(2, 2), pool_type="max"), dim=1)


class _PadShift(gluon.HybridBlock):
    """nasnet: zero Pad at the bottom/right, slice off the first row and column (a shift), average pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(6, 3, padding=1, in_channels=3)

    def hybrid_forward(self, F, x):
        y = F.relu(self.conv(x))
        s = F.slice(F.pad(y, mode="constant", pad_width=(0, 0, 0, 0, 0, 1, 0, 1)), begin=(0, 0, 1, 1),
                    end=(None, None, None, None))
        return F.concat(F.Pooling(s, kernel=(1, 1), stride=(2, 2), pool_type="avg"),
                        F.Pooling(y, kernel=(1, 1), stride=(2, 2), pool_type="avg"), dim=1)


class _PoolPad(gluon.HybridBlock):
    """nasnet's MaxPoolPad / AvgPoolPad: zero Pad top/left, 3x3/2 pooling with pad 1, slice off row and column 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(6, 3, padding=1, in_channels=3)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        outs = []
        for kw in ({"pool_type": "max"}, {"pool_type": "avg", "count_include_pad": False}):
            p = F.Pooling(F.pad(y, mode="constant", pad_width=(0, 0, 0, 0, 1, 0, 1, 0)), kernel=(3, 3),
                          stride=(2, 2), pad=(1, 1), **kw)
            outs.append(F.slice(p, begin=(0, 0, 1, 1), end=(None, None, None, None)))
        return F.concat(*outs, dim=1)


class _ConvPad(gluon.HybridBlock):
    """nasnet's BranchSeparablesReduction: zero Pad top/left, strided depthwise + pointwise conv, slice off row and
    column 0 (any zero Pad and spatial slice: a depthwise one-hot conv)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(6, 3, padding=1, in_channels=3)
        self.dw = nn.Conv2D(6, 5, 2, 2, groups=6, in_channels=6)
        self.pw = nn.Conv2D(6, 1, in_channels=6)

    def hybrid_forward(self, F, x):
        y = F.pad(F.relu(self.conv(x)), mode="constant", pad_width=(0, 0, 0, 0, 1, 0, 1, 0))
        return F.slice(self.pw(self.dw(y)), begin=(0, 0, 1, 1), end=(None, None, None, None))


class _SplitAttention(gluon.HybridBlock):
    """resnest's split attention, radix 2, cardinality 2: sums over the radix view, radix softmax, weighted sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(16, 3, padding=1, in_channels=3)
        self.fc1, self.fc2 = nn.Conv2D(6, 1, in_channels=8), nn.Conv2D(16, 1, in_channels=6)

    def hybrid_forward(self, F, x):
        y = F.reshape(F.relu(self.conv(x)), (0, -4, 2, -1, -2))
        gap = F.contrib.AdaptiveAvgPooling2D(F.sum(y, axis=1), output_size=1)
        att = F.reshape(self.fc2(F.relu(self.fc1(gap))), (0, 2, 2, -1)).swapaxes(1, 2)
        att = F.reshape(F.softmax(att, axis=1), (0, 2, -1, 1, 1))
        return F.sum(F.broadcast_mul(att, y), axis=1)


#: op -> (net factory, the op the rewrite produces in the written graph)
CASES = {
    "broadcast_mul": (_SE, "UpSampling"),
    "UpSampling": (_Upsample, "UpSampling"),
    "ShuffleChannel": (lambda: _Shuffle(False), "Convolution"),
    "slice_axis": (lambda: _Shuffle(True), "Convolution"),
    "HardSwish": (_HardSwish, "elemwise_mul"),
    "Pooling_count_include_pad": (_AvgPoolPad, "Convolution"),
    "Pad": (_PadShift, "Convolution"),
    "Pad_pool_slice": (_PoolPad, "Pooling"),
    "Pad_conv_slice": (_ConvPad, "Convolution"),
    "split_attention": (_SplitAttention, "Activation"),
}


def on_grid_net(net: gluon.HybridBlock) -> gluon.HybridBlock:
    """Every weight moved onto Tengine's per-channel int8 grid (so the export keeps the net's fp32 function)."""
    for name, p in net.collect_params().items():
        if name.endswith("weight"):
            p.set_data(mx.nd.array(tengine.on_grid(p.data().asnumpy())[0]))
    return net


def build(op: str, seed: int = 0) -> gluon.HybridBlock:
    mx.random.seed(seed)
    net = CASES[op][0]()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net.hybridize()
    net(mx.nd.zeros(SHAPE))
    return on_grid_net(net)


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + SHAPE[1:]).astype(np.float32)


def export(op: str, out: Path) -> tuple[gluon.HybridBlock, tengine.TengineExport, list[Path]]:
    """The tiny net of ``op``, lowered (min-max calibrated on 32 images) and written to ``out``."""
    net = build(op)
    exp = tengine.lower_model(from_gluon(net, SHAPE, name=op.lower()), [images(32)])
    return net, exp, write(exp, out)


@pytest.mark.parametrize("op", sorted(CASES))
def test_simulation_equals_reference_and_fp32_parity(op, tmp_path):
    net, exp, paths = export(op, tmp_path)
    ops = {n.op for n in exp.graph.nodes}
    assert CASES[op][1] in ops and not ops & {"broadcast_mul", "broadcast_add", "ShuffleChannel", "HardSwish",
                                               "HardSigmoid", "slice_axis", "slice", "Pad", "SwapAxis", "sum",
                                               "softmax"}
    x = images(32)  # the calibration images: no input clipped
    ref = TengineReference(*paths[:3], input_shape=SHAPE)
    step = ref.step(ref.graph.outputs[0])
    codes_ref = np.rint(ref(x) / step).astype(np.int64)
    codes_sim = np.rint(simulate(exp, x) / step).astype(np.int64)
    assert np.abs(codes_ref).max() > 20  # a real signal, not a saturated or zero output
    np.testing.assert_array_equal(codes_sim.reshape(codes_ref.shape), codes_ref)
    # the written json/params in MXNet (fp32) compute the net's function
    sym = mx.sym.load(str(paths[0]))
    params = {k.split(":", 1)[1]: v for k, v in mx.nd.load(str(paths[1])).items()}
    exe = sym.bind(mx.cpu(), {"data": mx.nd.array(x), **{k: v for k, v in params.items()
                                                        if k in sym.list_arguments()}},
                   aux_states={k: params[k] for k in sym.list_auxiliary_states()}, grad_req="null")
    got, want = exe.forward(is_train=False)[0].asnumpy(), net(mx.nd.array(x)).asnumpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the int8 model stays close to the fp32 one
    err = np.abs(codes_ref * step - want.reshape(codes_ref.shape)).max() / step
    assert err <= 8, f"int8 output {err:.1f} steps from fp32"


def test_hard_swish_as_depthwise_convs(tmp_path):
    """HardSwish -> conv(1, 3) + ReLU6 fused + conv(1/6) + elemwise_mul; its output keeps the node's name."""
    _, exp, _ = export("HardSwish", tmp_path)
    lowered = [n for n in exp.graph.nodes if n.attrs.get("lowered_from") in ("HardSwish", "HardSigmoid")]
    assert len(lowered) == 4 and all(n.attrs["num_group"] == 8 for n in lowered)
    assert sum(1 for v in exp.fused.values() if v == "relu6") == 2
    assert all(n.op != "clip" or n.attrs["fusable_into"] for n in exp.graph.nodes)


def test_se_upsampling_shares_the_gate_scale(tmp_path):
    """The SE factor, its Reshape and its UpSampling have one step (Reshape copies bytes, spec §3.3/§5)."""
    _, exp, _ = export("broadcast_mul", tmp_path)
    up = next(n for n in exp.graph.nodes if n.op == "UpSampling")
    rs = exp.graph.producer(up.inputs[0])
    assert rs.op == "Reshape"
    steps = {exp.scale_of(exp.tensor_map[t]).step for t in (up.output, up.inputs[0], rs.inputs[0])}
    assert len(steps) == 1


def _se_gate(F, x):
    return F.broadcast_mul(x, F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type="avg"))


@pytest.mark.parametrize("build_net,msg", [
    (lambda F, x: F.contrib.BilinearResize2D(x, height=16, width=16),
     r"op _contrib_BilinearResize2D .*not in Tengine's MXNet converter.*align_corners"),
    (lambda F, x: _se_gate(F, F.Pooling(x, kernel=(1, 2), stride=(1, 2), pool_type="max")),  # 8x4: not square
     r"op broadcast_mul .*BroadMul, which has no int8 kernel"),
    (lambda F, x: F.pad(x, mode="edge", pad_width=(0, 0, 0, 0, 1, 0, 1, 0)),
     r"op Pad .*not in Tengine's MXNet converter.*not other modes"),
])
def test_refusals_name_layer_op_and_limit(build_net, msg):
    class _Net(gluon.HybridBlock):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2D(4, 3, padding=1, in_channels=3)

        def hybrid_forward(self, F, x):
            return build_net(F, self.conv(x))

    net = _Net()
    net.initialize()
    net(mx.nd.zeros(SHAPE))
    with pytest.raises(tengine.TengineExportError, match=r"layer '.*' \(.*\): " + msg):
        tengine.lower_model(from_gluon(net, SHAPE, name="refused"), [images(4)])
