"""``dorefa``: DoReFa-Net weights (Zhou et al. 2016) on the engine's max-abs grid."""

from __future__ import annotations

from typing import Any

from ..fakequant import fake_quantize
from .base import Quantizer, reduce_absmax


class DoReFaQuantizer(Quantizer):
    """Weights: ``u = tanh(w) / max|tanh(w)|`` rounded to ``round(u * qmax) / qmax``, rescaled by ``max|w|`` (per
    unit) so that they land on the grid ``max|w| / qmax`` the engine uses; activations as ``qat``."""

    name = "dorefa"
    fused = True  # activations: dq_act_quant
    fused_weight = False  # weights: MXNet operators (tanh is not in dq_weight_quant)

    def quantize_weight(self, F, w, params: dict[str, Any]):
        grid, prof = self.config.weight, self.profile
        amax = F.BlockGrad(self.weight_absmax(F, w))
        t = F.tanh(w)
        tmax = reduce_absmax(F, t, grid.granularity, self.groups, self.out_channels, self.weight_ndim)
        u = F.broadcast_div(t, F.where(tmax > 0, tmax, F.ones_like(tmax)))
        q = fake_quantize(F, u, F.ones_like(tmax) * grid.qmax, grid.qmin, grid.qmax, None, prof.rounding,
                          "multiplier")
        return F.broadcast_mul(q, amax)
