"""Fake quantization on an integer grid, written with MXNet ``F`` ops so blocks stay hybridizable.

Convention: ``step`` is the float value of one integer unit (MXNet/ONNX/Tengine "scale"); an ncnn scale is a
*multiplier* ``1/step`` (``qmax/threshold``). With ``convention="multiplier"`` the codes are computed as
``round(x * multiplier)`` exactly as ncnn's ``float2int8(x * scale)`` does; with ``"step"`` as ``round(x / step)``.

    q  = clip(round(x / step) + zero_point, qmin, qmax)
    x̂ = (q - zero_point) * step

Rounding is half away from zero (MXNet ``round`` = C ``round``; NumPy's ``np.round`` is half-to-even and is not
used) or half to even (ONNX QuantizeLinear). The gradient is straight-through: identity through ``round`` and
zero where the rounded value was clipped (``clip``'s own gradient mask), unless ``mask_clipped=False``.
"""

from __future__ import annotations

import numpy as np


def round_half_even(F, v):
    """Round half to even with MXNet ops (``round`` alone rounds ties away from zero)."""
    r = F.round(v)
    tie = F.abs(v - F.trunc(v)) == 0.5
    return F.where(tie, 2 * F.round(v * 0.5), r)


def round_ste(F, v, rounding: str = "half_away_from_zero"):
    """``round`` in the forward, identity in the backward."""
    r = F.round(v) if rounding == "half_away_from_zero" else round_half_even(F, v)
    return v + F.BlockGrad(r - v)


def fake_quantize(F, x, scale, qmin: int, qmax: int, zero_point=None, rounding: str = "half_away_from_zero",
                  convention: str = "step", mask_clipped: bool = True):
    """Quantize-dequantize ``x`` (see module docstring).

    ``scale`` is in the profile's convention: a multiplier (``q = round(x * scale)``) or a step
    (``q = round(x / scale)``); it broadcasts against ``x``.
    """
    v = F.broadcast_mul(x, scale) if convention == "multiplier" else F.broadcast_div(x, scale)
    q = round_ste(F, v, rounding)
    if zero_point is not None:
        q = F.broadcast_add(q, zero_point)
    if mask_clipped:
        q = F.clip(q, qmin, qmax)
    else:
        q = q + F.BlockGrad(F.clip(q, qmin, qmax) - q)
    if zero_point is not None:
        q = F.broadcast_sub(q, zero_point)
    return F.broadcast_div(q, scale) if convention == "multiplier" else F.broadcast_mul(q, scale)


def scale_from_threshold(F, threshold, qmax: int, convention: str):
    """Scale for a symmetric threshold T: multiplier ``qmax/T`` or step ``T/qmax`` (1 where T == 0)."""
    safe = F.where(threshold > 0, threshold, F.ones_like(threshold))
    return qmax / safe if convention == "multiplier" else safe / qmax


def grad_scale(F, v, scale: float):
    """Identity in the forward; gradient multiplied by ``scale`` (LSQ's step-gradient scaling)."""
    return v * scale + F.BlockGrad(v - v * scale)


# ---------------------------------------------------------------- NumPy references (tests, exporters)

def np_round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``round()``: ties away from zero (what ncnn's float2int8 and Tengine do)."""
    v = np.asarray(v)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def np_quantize(x: np.ndarray, step, qmin: int, qmax: int, zero_point=0, rounding: str = "half_away_from_zero",
                convention: str = "step") -> np.ndarray:
    """Integer codes of ``x`` in float32 arithmetic, as the engines compute them."""
    x = np.asarray(x, dtype=np.float32)
    step = np.asarray(step, dtype=np.float32)
    v = x * (np.float32(1.0) / step) if convention == "multiplier" else x / step
    r = np_round_half_away(v) if rounding == "half_away_from_zero" else np.rint(v)
    return np.clip(r + zero_point, qmin, qmax).astype(np.int32)
