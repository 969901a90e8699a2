"""``qat``: quantization-aware training on the engine's grid (the default algorithm)."""

from __future__ import annotations

from .base import Quantizer


class QATQuantizer(Quantizer):
    """Activations on the moving-average range, weights max-abs per unit; straight-through gradient through
    ``round``, zero where an activation code is clipped to the grid."""

    name = "qat"
    fused = True
    fused_weight = True
