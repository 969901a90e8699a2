"""Engine profiles: how each inference engine computes int8, as data (one JSON file per engine)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

GRANULARITIES = ("layer", "group", "channel")
ROUNDINGS = ("half_away_from_zero", "half_to_even")
#: how the engine adds a quantized layer's bias: ``float`` (to the dequantized accumulator) or ``int32``
#: (codes on the grid ``input_step * weight_step[c]``, round half to even, added to the int32 accumulator:
#: onnxruntime's QLinearConv/QGemm, TFLite)
BIAS_MODES = ("float", "int32")
#: which quantized layers get an output quantization point automatically (``deployq.quantize``): ``none``, or
#: ``non_layer_consumers``: a layer with quantized input and weights whose output (after a folded BatchNorm and
#: a ReLU only it feeds) is read by something other than a Conv2D/Dense layer (Add, pooling, concat; the graph
#: output does not count), so that an engine that fuses ``DQ -> Conv -> Q`` into an integer kernel
#: (onnxruntime's QLinearConv) finds the Q it needs
OUTPUT_MODES = ("none", "non_layer_consumers")


@dataclass(frozen=True)
class TensorGrid:
    """An integer grid: ``bits``, signedness and whether the most negative code is dropped (narrow range:
    int8 -> [-127, 127] as ncnn and Tengine use; full range -> [-128, 127]).

    Weights: ``granularity`` for a plain Conv/Dense, ``depthwise_granularity`` for a depthwise conv and
    ``grouped_granularity`` for a grouped conv with ``1 < groups < channels`` (ncnn's ConvolutionDepthWise keeps
    one weight scale per group: ``group``); ``group`` on a conv with one group is per channel."""

    bits: int = 8
    signed: bool = True
    narrow_range: bool = True
    symmetric: bool = True
    granularity: str = "layer"
    depthwise_granularity: str = "group"
    grouped_granularity: str = "channel"
    allow_unsigned: bool = True

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1) - 1) if self.narrow_range else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1


@dataclass(frozen=True)
class Profile:
    """How one engine computes int8.

    ``scale_convention`` says how the engine stores a scale: ``multiplier`` (ncnn: q = round(x * scale),
    scale = qmax / threshold) or ``step`` (Tengine, ONNX, MXNet: q = round(x / scale), scale = threshold / qmax).
    The simulation uses the same operation, so training and deployment round identically.

    ``bias`` (one of :data:`BIAS_MODES`) says whether the engine adds a quantized layer's bias in float or as
    int32 codes on the grid ``input_step * weight_step[c]``; exporters write it that way.

    ``quantize_outputs`` (one of :data:`OUTPUT_MODES`) says which layers get an output quantization point
    without asking for it in the config list.
    """

    name: str
    description: str
    weight: TensorGrid
    activation: TensorGrid
    rounding: str = "half_away_from_zero"
    scale_convention: str = "step"
    fold_bn: bool = True
    max_bits: int = 8
    quantize_points: str = "layer_inputs"
    winograd_3x3: str = "ignore"
    bias: str = "float"
    quantize_outputs: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def with_options(self, **changes: Any) -> Profile:
        """A copy with some fields changed (e.g. ``winograd_3x3='six_bit'``)."""
        return replace(self, **changes)


def _grid(d: dict[str, Any], granularity_default: str = "layer") -> TensorGrid:
    d = dict(d)
    d.setdefault("granularity", granularity_default)
    return TensorGrid(**d)


def available_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".json"))


def load_profile(profile: str | Profile) -> Profile:
    """Load a profile by name (``ncnn``, ``tengine``, ``onnx``, ``custom``) or pass a Profile through."""
    if isinstance(profile, Profile):
        return profile
    names = available_profiles()
    if profile not in names:
        raise ValueError(f"unknown profile {profile!r}; available profiles: {', '.join(names)}")
    d = json.loads(resources.files(__package__).joinpath(f"{profile}.json").read_text())
    w, a = _grid(d.pop("weight"), "channel"), _grid(d.pop("activation"))
    if d["rounding"] not in ROUNDINGS:
        raise ValueError(f"profile {profile}: rounding must be one of {ROUNDINGS}")
    if d.get("bias", "float") not in BIAS_MODES:
        raise ValueError(f"profile {profile}: bias must be one of {BIAS_MODES}")
    if d.get("quantize_outputs", "none") not in OUTPUT_MODES:
        raise ValueError(f"profile {profile}: quantize_outputs must be one of {OUTPUT_MODES}")
    return Profile(weight=w, activation=a, **d)
