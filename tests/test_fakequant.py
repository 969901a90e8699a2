"""Fake quantization against NumPy references of the documented arithmetic."""

import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mxnet import autograd

from deployq.fakequant import fake_quantize, np_quantize, np_round_half_away


def _fq(x, scale, qmin, qmax, zp=None, rounding="half_away_from_zero", convention="step", mask=True):
    xs = mx.nd.array(x)
    xs.attach_grad()
    with autograd.record():
        y = fake_quantize(mx.nd, xs, mx.nd.array(scale), qmin, qmax,
                          None if zp is None else mx.nd.array(zp), rounding, convention, mask)
    y.backward()
    return y.asnumpy(), xs.grad.asnumpy()


def test_ties_round_half_away_from_zero():
    step = 0.25  # exact in binary, so x/step hits .5 ties exactly
    x = np.array([0.125, 0.375, -0.125, -0.375, 0.625, -0.625, 31.875], np.float32)
    y, _ = _fq(x, [step], -127, 127)
    # MXNet/C round: 0.5 -> 1, 1.5 -> 2, -0.5 -> -1, -1.5 -> -2, 2.5 -> 3, 127.5 -> 127 (clipped)
    np.testing.assert_array_equal(y / step, [1, 2, -1, -2, 3, -3, 127])
    assert not np.array_equal(np.round(x / step), y / step), "np.round is half-to-even and must differ here"


def test_ties_round_half_to_even_for_onnx():
    x = np.array([0.125, 0.375, -0.125, -0.375, 0.625], np.float32)
    y, _ = _fq(x, [0.25], -128, 127, rounding="half_to_even")
    np.testing.assert_array_equal(y / 0.25, np.rint(x / 0.25))


def test_multiplier_convention_matches_ncnn_float2int8():
    rng = np.random.default_rng(0)
    x = rng.normal(size=1000).astype(np.float32) * 3
    thr = np.float32(2.5)
    mult = np.float32(127) / thr
    y, _ = _fq(x, [mult], -127, 127, convention="multiplier")
    codes = np.clip(np_round_half_away(x * mult), -127, 127)  # ncnn: float2int8(x * scale)
    np.testing.assert_array_equal(np.round(y * mult), codes)


def test_clipped_straight_through_gradient():
    x = np.array([-3.0, -1.0, 0.2, 0.9, 1.2, 5.0], np.float32)
    step = 1.0 / 7  # 4-bit signed narrow: qmax 7 -> threshold 1.0
    y, g = _fq(x, [step], -7, 7)
    inside = np.abs(np_round_half_away(x / step)) <= 7
    np.testing.assert_array_equal(g, inside.astype(np.float32))
    np.testing.assert_allclose(y, np.clip(np_round_half_away(x / step), -7, 7) * step, rtol=1e-6)


def test_affine_uint8_zero_point():
    x = np.array([-1.0, -0.5, 0.0, 0.3, 2.0, 3.5], np.float32)
    lo, hi = -1.0, 3.0
    step = (hi - lo) / 255
    zp = float(np.round(-lo / step))
    y, g = _fq(x, [step], 0, 255, zp=[zp], rounding="half_to_even")
    q = np.clip(np.rint(x / np.float32(step)) + zp, 0, 255)
    np.testing.assert_allclose(y, (q - zp) * np.float32(step), rtol=1e-6, atol=1e-7)
    assert g[-1] == 0 and g[2] == 1  # 3.5 is clipped, 0.0 is not


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50.0, 50.0, width=32), min_size=1, max_size=64), st.integers(2, 8),
       st.floats(0.0625, 10.0, width=32))
def test_property_matches_numpy_reference(values, bits, thr):
    x = np.array(values, np.float32)
    qmax = 2 ** (bits - 1) - 1
    step = np.float32(thr) / qmax
    y, _ = _fq(x, [step], -qmax, qmax)
    codes = np_quantize(x, step, -qmax, qmax)
    np.testing.assert_array_equal(np.round(y / step).astype(np.int32), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_stay_on_grid(bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=500).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    step = np.float32(np.abs(x).max() / qmax)
    y, _ = _fq(x, [step], -qmax, qmax)
    codes = y / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.abs(np.round(codes)).max() == qmax
