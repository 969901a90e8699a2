"""``observer``: collect min/max ranges while training in float (post-training quantization by observation)."""

from __future__ import annotations

from .base import Quantizer


class ObserverQuantizer(Quantizer):
    """The layer computes in float while training and records the running min/max of its input (and output);
    in inference it quantizes on that range, weights max-abs."""

    name = "observer"
    fused = True  # dq_act_quant's observer=1 computes this update_range
    fused_weight = True
    observer = True

    def update_range(self, F, lo, hi, batch_lo, batch_hi, momentum: float):
        """The running minimum and maximum (no moving average)."""
        return F.minimum(lo, batch_lo), F.maximum(hi, batch_hi)
