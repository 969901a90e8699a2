"""The arm64 Tengine kernel family (``exporters/tengine/arm64.py``, ``kernels.py``): the fixed-point conv
requantization against an integer-only per-element re-derivation of the AArch64 instructions, against the exact
product, against the x86 model on a small export; the kernel choice and the layers the aarch64 build cannot run;
``export-tengine --kernels arm64`` and ``deployq verify`` on it. (Against Tengine's aarch64 build itself:
``tests/engines/test_arm_tengine.py``.)"""

from __future__ import annotations

import json
import math
import warnings

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.tengine import reference as ref
from deployq.exporters.tengine.arm64 import Arm64TengineReference, fixed_point_requant, sqrdmulh
from deployq.exporters.tengine.cli import export_tengine
from deployq.exporters.tengine.kernels import arm64_problem, conv_kernel, fixed_point, kernel_family
from deployq.exporters.tengine.runtime import export_files
from mxnet.gluon import nn

from deployq.cli import main
from deployq.profiles import load_profile

F32 = np.float32
I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1


def _one(a: int, s_in: float, s_w: float, s_out: float, lo: int, hi: int) -> int:
    """One output of Tengine's aarch64 requantization, in Python integers from the instructions' definitions
    (ARM ARM): SQRDMULH = SignedSat32((2*a*M + 2^31) >> 32); SSHL by e > 0 keeps the low 32 bits; SRSHL by
    -n adds 2^(n-1) before the arithmetic shift; then SMAX/SMIN."""
    scale = float(F32(F32(s_in) * F32(s_w)) / F32(s_out))
    q, e = math.frexp(scale)
    m = math.floor(q * 2 ** 31 + 0.5)
    if m == 2 ** 31:
        m, e = m // 2, e + 1
    y = max(I32_MIN, min(I32_MAX, (2 * a * m + 2 ** 31) >> 32))
    if e > 0:
        y = (y << e) & 0xFFFFFFFF
        y -= (y >> 31) << 32
    elif e < 0:
        y = (y + (1 << (-e - 1))) >> -e
    return max(lo, min(hi, y))


@pytest.mark.parametrize("lo, hi", [(-127, 127), (0, 127), (0, 41)])
def test_fixed_point_requant_equals_integer_rederivation(lo, hi):
    """Random int32 accumulators (extremes included) and per-channel scales from 2^-26 to 6 (shifts e < 0,
    e = 0 and e > 0, where a large accumulator wraps in SSHL)."""
    rng = np.random.default_rng(0)
    c = 24
    s_in, s_out = 0.02, 0.05
    s_w = (np.exp2(rng.uniform(-25, 3.9, c)) * s_out / s_in).astype(F32)
    s_w[:3] = (np.array([0.5, 1.0, 2.0]) * s_out / s_in).astype(F32)  # scale of one, and e = 0 / e = 1 borders
    acc = rng.integers(-3000, 3000, (2, c, 5, 5)).astype(np.int64)
    acc[0, :, 0, :] = [I32_MIN, I32_MAX, 0, -1, 1]
    acc[1, :, 1, :] = rng.integers(I32_MIN, I32_MAX, (c, 5))
    got = fixed_point_requant(acc, s_in, s_w, s_out, lo, hi)
    want = np.array([[[[_one(int(acc[n, k, i, j]), s_in, float(s_w[k]), s_out, lo, hi) for j in range(5)]
                       for i in range(5)] for k in range(c)] for n in range(2)])
    np.testing.assert_array_equal(got.astype(np.int64), want)


def test_sqrdmulh_saturates_and_rounds():
    a = np.array([I32_MIN, I32_MIN, I32_MAX, 3, -3, 1 << 30, -(1 << 30)], np.int64)
    m = np.array([I32_MIN, I32_MAX, I32_MAX, 1 << 30, 1 << 30, 1 << 30, 1 << 30], np.int64)
    want = [max(I32_MIN, min(I32_MAX, (2 * int(x) * int(y) + 2 ** 31) >> 32)) for x, y in zip(a, m, strict=True)]
    assert sqrdmulh(a, m).tolist() == want
    assert want[0] == I32_MAX  # the one saturating case: (-2^31) * (-2^31)


def test_fixed_point_within_one_code_of_exact_rounding():
    """SQRDMULH then a rounding shift round twice: at most one code from round(acc * scale) in exact arithmetic,
    and almost always equal."""
    rng = np.random.default_rng(1)
    s_in, s_out = 0.013, 0.071
    s_w = rng.uniform(0.0005, 0.02, 16).astype(F32)
    acc = rng.integers(-40000, 40000, (64, 16, 4, 4)).astype(np.int64)
    got = fixed_point_requant(acc, s_in, s_w, s_out).astype(np.int64)
    scale = ((F32(s_in) * s_w) / F32(s_out)).astype(np.float64)[None, :, None, None]
    exact = np.clip(np.sign(acc) * np.floor(np.abs(acc) * scale + 0.5), -127, 127)
    assert np.abs(got - exact).max() <= 1
    assert (got == exact).mean() > 0.99


@pytest.mark.parametrize("attrs, cin, cout, kernel", [
    ({"kernel": (3, 3), "stride": (1, 1), "num_group": 1}, 8, 16, "arm_gemm"),
    ({"kernel": (1, 1), "stride": (2, 2), "num_group": 1}, 8, 16, "arm_gemm"),
    ({"kernel": (3, 3), "stride": (1, 1), "num_group": 4}, 16, 16, "arm_gemm"),  # grouped: gemm per group
    ({"kernel": (3, 3), "stride": (2, 2), "num_group": 8}, 8, 8, "arm_dw"),
    ({"kernel": (5, 5), "stride": (1, 1), "num_group": 8}, 8, 8, "arm_dw"),  # taken, and miscomputed
    ({"kernel": (7, 7), "stride": (1, 1), "num_group": 8}, 8, 8, "ref"),
    ({"kernel": (2, 2), "stride": (1, 1), "num_group": 8}, 8, 8, "ref"),
    ({"kernel": (3, 3), "stride": (1, 1), "num_group": 8, "dilate": (2, 2)}, 8, 8, "ref"),
])
def test_arm64_conv_kernel_selection(attrs, cin, cout, kernel):
    assert conv_kernel(attrs, cin, cout, family="arm64") == kernel
    assert fixed_point(kernel) == (kernel != "ref")


def _dw(k: int = 3, s: int = 1, p: int = 1) -> dict:
    return {"kernel": (k, k), "stride": (s, s), "pad": (p, p), "num_group": 16}


@pytest.mark.parametrize("attrs, cin, hw, cout, ohw, expect", [
    ({**_dw(), "num_group": 1}, 3, (8, 8), 16, (8, 8), None),
    ({**_dw(), "num_group": 1}, 3, (8, 8), 8, (8, 8), "i8gemm_4x4_a72_int8.S"),  # 8 of 8 channels
    ({**_dw(), "num_group": 1}, 16, (8, 8), 40, (8, 8), "the 8 of 40 output channels"),
    (_dw(), 16, (8, 8), 16, (8, 8), None),
    (_dw(s=2), 16, (7, 9), 16, (4, 5), None),  # same parity
    (_dw(s=2), 16, (8, 7), 16, (4, 4), "assumes input_h = input_w"),
    (_dw(s=2), 16, (8, 2), 16, (4, 1), "loops over memory"),
    (_dw(s=2), 16, (2, 8), 16, (1, 4), "1-high output"),
    (_dw(5, 1, 2), 16, (8, 8), 16, (8, 8), "5x5 pad 2"),
    (_dw(7, 1, 3), 16, (8, 8), 16, (8, 8), None),  # the reference kernel
])
def test_arm64_problem(attrs, cin, hw, cout, ohw, expect):
    """The cases reproduced in Tengine's aarch64 build under qemu (docs/arm.md)."""
    why = arm64_problem(attrs, (1, cin, *hw), (1, cout, *ohw))
    assert why is None if expect is None else expect in why


def _net(concat: bool = True) -> nn.HybridBlock:
    class Net(nn.HybridBlock):
        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2D(16, 3, padding=1, in_channels=3)
            self.dw = nn.Conv2D(16, 3, strides=2, padding=1, groups=16, in_channels=16)
            self.pw = nn.Conv2D(16, 1, in_channels=16)
            self.fc = nn.Dense(5)

        def hybrid_forward(self, F, x):
            a = F.relu(self.c0(x))
            b = F.clip(self.dw(a), 0, 6)
            c = self.pw(b)
            if concat:
                c = F.concat(c, F.Pooling(a, kernel=(2, 2), stride=(2, 2), pool_type="max"), dim=1)
            return self.fc(F.Pooling(c, kernel=(2, 2), stride=(2, 2), pool_type="avg"))

    mx.random.seed(2)
    n = Net()
    n.initialize(mx.init.Xavier(magnitude=2.0))
    return n


def _arm64_profile():
    p = load_profile("tengine")
    return p.with_options(extra={**p.extra, "kernels": "arm64"})


def test_arm64_model_vs_x86_model_on_a_small_export(tmp_path):
    """Fed the same input codes, every conv of the arm64 model is within one code of the x86 model's (and equal
    on most outputs); the whole net (conv, depthwise, ReLU6, concat, pooling, FC) runs on arm64."""
    rng = np.random.default_rng(3)
    g = from_gluon(_net(), (1, 3, 16, 16), name="small")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_tengine(g, tmp_path, "small", [rng.normal(size=(64, 3, 16, 16)).astype(F32)], profile=_arm64_profile())
    f = export_files(tmp_path)
    arm, x86 = Arm64TengineReference(*f), ref.TengineReference(*f)
    x = rng.normal(size=(16, 3, 16, 16)).astype(F32)
    vals = x86.run_int8(x)
    convs = [n for n in x86.graph.nodes if n.op == "Convolution"]
    assert len(convs) == 3
    for n in convs:
        s_in = x86.step(n.inputs[0])
        q, s_w, qb = x86._weights(n, s_in)
        acc = ref._conv_acc(vals[n.inputs[0]], q, n.attrs) + qb[None, :, None, None]
        s_out = x86.steps[n.output]
        a = arm._conv_requant(n, acc, s_in, s_w, s_out, q.shape[0]).astype(np.int64)
        b = x86._conv_requant(n, acc, s_in, s_w, s_out, q.shape[0]).astype(np.int64)
        assert np.abs(a - b).max() <= 1, n.name
        assert (a == b).mean() > 0.9, n.name
    out = arm.graph.outputs[0]
    y_arm = arm.run_int8(x)[out].astype(np.int64)
    assert y_arm.shape == vals[out].shape and np.abs(y_arm - vals[out]).max() <= 3
    assert any(n.op == "Concat" for n in arm.graph.nodes)


def _symbol_model(tmp_path, channels: int):
    net = nn.HybridSequential()
    net.add(nn.Conv2D(channels, 3, padding=1, in_channels=3), nn.BatchNorm(), nn.Activation("relu"),
            nn.GlobalAvgPool2D(), nn.Dense(4))
    mx.random.seed(0)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 16, 16)))
    net.export(str(tmp_path / "m"))
    x = np.random.default_rng(0).normal(size=(12, 3, 16, 16)).astype(F32)
    np.savez(tmp_path / "x.npz", x=x)
    return ["--symbol", str(tmp_path / "m-symbol.json"), "--params", str(tmp_path / "m-0000.params"),
            "--input-shape", "1,3,16,16", "--data", str(tmp_path / "x.npz")]


def test_export_tengine_arm64_refuses_what_the_aarch64_build_miscomputes(tmp_path, capsys):
    args = _symbol_model(tmp_path, 8)
    out = tmp_path / "arm"
    assert main(["export-tengine", *args, "--kernels", "arm64", "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
    assert err.startswith("deployq export-tengine: error: --kernels arm64: layer '") and "i8gemm_4x4_a72_int8.S" in err
    assert main(["export-tengine", *args, "--out", str(out)]) == 0  # x86: fine
    assert json.loads((out / "deployq-export.json").read_text())["kernels"] == "x86"


def test_export_and_verify_arm64(tmp_path, capsys, monkeypatch):
    """The manifest records arm64, verify runs it by default (the NumPy model without the emulated runtime) and
    says so, and reports the distance to the x86 kernels' simulation; --kernels x86 overrides."""
    for var in ("TENGINE_ARM_RUNNER", "TENGINE_CONVERT_TOOL", "TENGINE_QUANT_TOOL", "TENGINE_LIB"):
        monkeypatch.delenv(var, raising=False)
    args = _symbol_model(tmp_path, 16)
    out = tmp_path / "arm"
    assert main(["export-tengine", *args, "--kernels", "arm64", "--out", str(out)]) == 0
    assert json.loads((out / "deployq-export.json").read_text())["kernels"] == "arm64"
    assert kernel_family(_arm64_profile()) == "arm64" and kernel_family(load_profile("tengine")) == "x86"
    capsys.readouterr()
    assert main(["verify", str(out), "--data", str(tmp_path / "x.npz"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kernels"] == "arm64" and "aarch64" in rep["runtime"] and "TENGINE_ARM_RUNNER" in rep["runtime"]
    assert rep["max_error_steps"] == 0 and rep["images"] == 12
    assert 0 <= rep["vs_x86_simulation"]["max_codes"] <= 2
    assert main(["verify", str(out), "--data", str(tmp_path / "x.npz"), "--kernels", "x86", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kernels"] == "x86" and "x86" in rep["runtime"] and "vs_x86_simulation" not in rep
