"""``bnn``: binarised weights and activations (Courbariaux et al. 2016)."""

from __future__ import annotations

from typing import Any

from .base import Quantizer


def _sign_ste(F, v):
    """``sign(v)`` (+1 at 0) in the forward; the gradient of ``clip(v, -1, 1)`` (straight through inside)."""
    c = F.clip(v, -1.0, 1.0)
    return c + F.BlockGrad(F.where(v >= 0, F.ones_like(v), -F.ones_like(v)) - c)


class BNNQuantizer(Quantizer):
    """Activations ``sign(x)``; weights ``sign(w) * max|w|`` per unit; gradients of ``clip(., -1, 1)``. The
    codes are ±1, not the profile's grid: no int32 bias and no block-output quantizers."""

    name = "bnn"
    int32_bias = False
    block_outputs = False

    def quantize_input(self, F, x, lo, hi, params: dict[str, Any]):
        return _sign_ste(F, x)

    def quantize_output(self, F, y, lo, hi, params: dict[str, Any]):
        return _sign_ste(F, y)

    def quantize_weight(self, F, w, params: dict[str, Any]):
        amax = F.BlockGrad(self.weight_absmax(F, w))
        c = F.clip(F.broadcast_div(w, amax + 1e-12), -1.0, 1.0)
        sign = F.where(w >= 0, F.ones_like(w), -F.ones_like(w))
        return F.broadcast_mul(c + F.BlockGrad(sign - c), amax)
