"""ncnn layer records: what the lowering produces and the writer serialises."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ParamValue = int | float | tuple[float, ...] | tuple[int, ...]


@dataclass
class WeightBlob:
    """One array of a layer's ``.bin`` data: ``tag`` None = untagged raw fp32, else the 4-byte storage tag."""

    data: np.ndarray
    tag: int | None = None


@dataclass
class LayerRecord:
    """One ncnn layer: type, unique name, bottom/top blob names, typed params (id -> int, float or array)
    and weight arrays in ``.bin`` order."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, ParamValue] = field(default_factory=dict)
    weights: list[WeightBlob] = field(default_factory=list)
    #: int8 bookkeeping for requantize fusion (input multiplier of a quantized layer)
    bottom_multiplier: np.float32 | None = None


@dataclass
class NcnnModel:
    layers: list[LayerRecord]
    input_blob: str
    output_blobs: list[str]

    @property
    def blob_count(self) -> int:
        return len({t for ly in self.layers for t in ly.tops})

    def layer(self, name: str) -> LayerRecord:
        return next(ly for ly in self.layers if ly.name == name)
