"""``naive``: the engine's grid with a plain straight-through gradient (clipped values keep theirs)."""

from __future__ import annotations

from .base import Quantizer


class NaiveQuantizer(Quantizer):
    """Activations on the tracked range, weights max-abs; the gradient passes straight through ``round`` and
    through the clip to the grid (``mask_clipped = False``)."""

    name = "naive"
    fused = True
    fused_weight = True
    mask_clipped = False
