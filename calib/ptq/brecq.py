"""Block reconstruction (BRECQ, Li et al. 2021) with QDrop (Wei et al. 2022): AdaRound's learned rounding
(``deployq.calib.ptq.adaround``: the same soft rounding on each layer's exact weight grid, regulariser and
schedule) for all layers of a block *jointly*, against the fp32 net's output of the block.

Blocks come from the exporters' graph IR (``deployq.calib.ptq.recon.block_units``): the graph is cut where a
single tensor is live, so a residual block runs from one residual Add's output to the next; consecutive
one-layer segments of a plain chain are grouped (mobilenet: depthwise + pointwise). A block with one layer is
AdaRound of that layer against the block's output. The block is fed its *simulated* input (every earlier block
quantized with its learned rounding) and runs its layers as the simulation does (each layer's input grid and
range); with ``qdrop = p`` every element of every layer input inside the block (the block's input included)
keeps its unquantized value with probability p in each iteration (QDrop's random dropping of activation
quantization). The learned codes are written into the stored weights, so the result is an ordinary quantized
net (checked: every layer rounds its stored weights back to exactly the learned codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from mxnet import gluon

from .adaround import AdaRoundConfig


@dataclass(frozen=True)
class BrecqConfig(AdaRoundConfig):
    """:class:`AdaRoundConfig` (iterations *per block*) with QDrop on by default; ``max_block_layers``: at
    most this many layers of a plain chain in one block (residual blocks are taken whole); ``learn_ranges``:
    learn each layer's input range with the rounding (QDrop's step-size learning; Adam, ``range_lr``)."""

    qdrop: float = 0.5
    max_block_layers: int = 4
    learn_ranges: bool = True
    range_lr: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_block_layers < 1 or self.range_lr <= 0:
            raise ValueError(f"BrecqConfig: max_block_layers must be >= 1 and range_lr > 0, got "
                             f"{self.max_block_layers}, {self.range_lr}")


def brecq(qnet: gluon.HybridBlock, x: np.ndarray, config: BrecqConfig | None = None,
          layers: list[str] | None = None, quiet: bool = True, reference: Any = None,
          diagnose: bool = False) -> dict[str, Any]:
    """Learn the rounding of the quantized layers (or ``layers``) of ``qnet`` block by block, in place, on
    calibration images ``x`` (calibrate the input ranges first). ``reference``: the fp32 graph IR to match
    (default: the net's float graph now). Returns per block (``units``) and per layer the share of codes
    changed and the seconds taken; with ``diagnose``, also the block output's MSE over ``x`` with nearest and
    with learned rounding."""
    from .recon import block_units, reconstruct

    cfg = config or BrecqConfig()
    return reconstruct(qnet, x, cfg, block_units, layers=layers, quiet=quiet, reference=reference, desc="brecq",
                       learn_ranges=cfg.learn_ranges, range_lr=cfg.range_lr, max_layers=cfg.max_block_layers,
                       diagnose=diagnose)
