"""The :class:`Quantizer` base class: how one algorithm quantizes one layer's weight, input and output.

A quantized layer (``deployq.blocks``) owns the state every algorithm shares (the tracked input/output ranges,
fake BN, the int32 bias) and asks its quantizer for the algorithm's part:

- ``update_range``: the tracked range after one training batch (moving average by default);
- ``input_quant_range``: the range the input is quantized with, from the tracked one (a learned clip: PACT);
- ``quantize_input`` / ``quantize_output`` / ``quantize_weight``: the fake-quantized tensor, written with MXNet
  ``F`` operators (the layer stays hybridizable); gradients are MXNet's own, or a hand-written backward with
  :func:`deployq.quantizers.with_gradient` (forward value, gradient of a surrogate; straight-through by default);
- ``create_params``: trainable parameters of the algorithm (LSQ's steps), registered on the layer;
- ``input_range`` / ``weight_step`` / ``weight_threshold``: the NumPy views the exporters write.

The defaults are the engine's arithmetic: activations on the range ``(lo, hi)`` with the profile's convention and
rounding, weights symmetric max-abs per quantization unit. A subclass that keeps them exports exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import mxnet as mx
import numpy as np

from ..fakequant import fake_quantize, scale_from_threshold

#: methods whose default the fused operators of ``deployq.native`` compute: a subclass overriding one of them
#: runs on MXNet operators unless it sets ``fused`` (activations) / ``fused_weight`` (weights) itself
_FUSED_ACTIVATION = ("update_range", "input_quant_range", "quantize_input", "quantize_output",
                     "quantize_activation")
_FUSED_WEIGHT = ("quantize_weight",)


def reduce_absmax(F, w, granularity: str, groups: int, out_channels: int, ndim: int):
    """max|w| per quantization unit, broadcastable against ``w`` (shape (O,1,...) or (1,...))."""
    a = F.abs(w)
    if granularity == "layer":
        return F.reshape(F.max(a), (1,) * ndim)
    if granularity == "group" and 1 < groups < out_channels:
        g = F.max(F.reshape(a, (groups, -1)), axis=1)
        return F.reshape(F.repeat(g, repeats=out_channels // groups), (-1,) + (1,) * (ndim - 1))
    return F.reshape(F.max(F.reshape(a, (0, -1)), axis=1), (-1,) + (1,) * (ndim - 1))


class Quantizer:
    """One quantization algorithm bound to one quantized layer (``layer``: a QuantConv2D, QuantDense or a
    block's OutputQuantizer; ``config`` its LayerConfig, ``profile`` the engine's Profile).

    Subclass it, override the ``quantize_*`` methods you need and register it with
    :func:`deployq.register_quantizer`; ``deployq.quantize(net, algorithm=name)`` then builds one per layer.
    Class attributes declare what the layers and exporters may rely on:

    - ``fused`` / ``fused_weight``: the fused operators of ``deployq.native`` compute this algorithm's
      activations / weights (built-ins only; reset to False for a subclass that overrides the math);
    - ``mask_clipped``: activation codes clipped to the grid get no gradient (False: straight through);
    - ``observer``: the layer computes in float while training (ranges are only observed);
    - ``int32_bias``: weights lie on the max-abs grid ``max|w| / qmax``, so a profile's int32 bias applies;
    - ``block_outputs``: the profile's block-output quantizers apply;
    - ``weight_convention``: None (the profile's) or ``"step"``: how the exporters' simulation divides weights
      by their step (a learned step is a step, not a multiplier).
    """

    name: ClassVar[str] = ""
    fused: ClassVar[bool] = False
    fused_weight: ClassVar[bool] = False
    mask_clipped: ClassVar[bool] = True
    observer: ClassVar[bool] = False
    int32_bias: ClassVar[bool] = True
    block_outputs: ClassVar[bool] = True
    weight_convention: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "fused" not in own and any(m in own for m in _FUSED_ACTIVATION):
            cls.fused = False
        if "fused_weight" not in own and any(m in own for m in _FUSED_WEIGHT):
            cls.fused_weight = False

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    @property
    def config(self) -> Any:
        """The layer's LayerConfig (``input`` / ``weight`` / ``output``: the TensorGrids, None when not
        quantized)."""
        return self.layer.layer_config

    @property
    def profile(self) -> Any:
        """The engine's Profile (``rounding``, ``scale_convention``, ...)."""
        return self.layer.profile

    @classmethod
    def forward_paths(cls) -> tuple[str, ...]:
        """The forward paths this algorithm runs on: ``"native"`` (deployq.native's fused operators, when they
        load) and ``"mxnet"`` (MXNet operators, always)."""
        return ("native", "mxnet") if cls.fused else ("mxnet",)

    # ------------------------------------------------------------------ layer geometry
    @property
    def out_channels(self) -> int:
        return int(self.layer.weight.shape[0])

    @property
    def groups(self) -> int:
        kw = getattr(self.layer, "_kwargs", None)
        return int(kw.get("num_group", 1)) if kw else 1

    @property
    def weight_ndim(self) -> int:
        return len(self.layer.weight.shape)

    def units(self) -> int:
        """How many weight quantization units (steps) the layer has: 1, its groups or its output channels."""
        g = self.config.weight.granularity
        if g == "layer":
            return 1
        if g == "group" and 1 < self.groups < self.out_channels:
            return self.groups
        return self.out_channels

    def weight_absmax(self, F, w):
        """max|w| per weight quantization unit, broadcastable against ``w``."""
        grid = self.config.weight
        return reduce_absmax(F, w, grid.granularity if grid else "channel", self.groups, self.out_channels,
                             self.weight_ndim)

    def add_param(self, name: str, value: np.ndarray) -> mx.gluon.Parameter:
        """Register a trainable float32 parameter ``name`` (initial ``value``) on the layer; the forward receives
        it in ``params[name]``, :func:`deployq.save` keeps it."""
        layer = self.layer
        ctx = layer.weight.list_ctx() if getattr(layer, "weight", None) is not None else None
        if ctx is None:
            ctx = layer.output_state.list_ctx()
        with layer.name_scope():
            prm = layer.params.get(name, shape=value.shape, init=mx.init.Zero())
        setattr(layer, name, prm)
        prm.initialize(ctx=ctx)
        prm.set_data(mx.nd.array(value))
        return prm

    # ------------------------------------------------------------------ hooks
    def create_params(self) -> None:
        """Register the algorithm's parameters on the layer (:meth:`add_param`); none by default."""

    def update_range(self, F, lo, hi, batch_lo, batch_hi, momentum: float):
        """The tracked range after one training batch (float64 (1,) symbols): a moving average."""
        return momentum * lo + (1 - momentum) * batch_lo, momentum * hi + (1 - momentum) * batch_hi

    def input_quant_range(self, F, lo, hi, params: dict[str, Any]):
        """The range (float32 (1,) each) the layer's input is quantized with, from its tracked (or calibrated,
        or batch) range; the int32 bias grid and the exporters use it too. Default: the tracked range."""
        return lo, hi

    def quantize_activation(self, F, x, grid, lo, hi):
        """``x`` fake-quantized on ``grid`` with the range ``(lo, hi)`` (float32 (1,)), as the engine computes
        it: symmetric threshold ``max(|lo|, |hi|)`` (``hi`` when unsigned), or affine with a zero point."""
        prof = self.profile
        if grid.symmetric:
            thr = F.maximum(F.abs(lo), F.abs(hi)) if grid.signed else F.relu(hi)
            scale = scale_from_threshold(F, thr, grid.qmax, prof.scale_convention)
            return fake_quantize(F, x, scale, grid.qmin, grid.qmax, None, prof.rounding, prof.scale_convention,
                                 mask_clipped=self.mask_clipped)
        lo0, hi0 = F.minimum(lo, F.zeros_like(lo)), F.maximum(hi, F.zeros_like(hi))
        span = hi0 - lo0
        step = F.where(span > 0, span, F.ones_like(span)) / (grid.qmax - grid.qmin)
        zp = F.clip(F.round(grid.qmin - lo0 / step), grid.qmin, grid.qmax)
        return fake_quantize(F, x, step, grid.qmin, grid.qmax, zp, prof.rounding, "step",
                             mask_clipped=self.mask_clipped)

    def quantize_input(self, F, x, lo, hi, params: dict[str, Any]):
        """The layer's input ``x`` fake-quantized on ``config.input`` (``lo``/``hi``: from
        :meth:`input_quant_range`)."""
        return self.quantize_activation(F, x, self.config.input, lo, hi)

    def quantize_output(self, F, y, lo, hi, params: dict[str, Any]):
        """The layer's (or block's) output ``y`` fake-quantized on ``config.output``."""
        return self.quantize_activation(F, y, self.config.output, lo, hi)

    def quantize_weight(self, F, w, params: dict[str, Any]):
        """The (BN-folded) weight ``w`` fake-quantized on ``config.weight``: symmetric, step ``max|w| / qmax``
        per unit, straight-through gradient (the grid never clips max|w|)."""
        grid, prof = self.config.weight, self.profile
        amax = F.BlockGrad(self.weight_absmax(F, w))
        scale = scale_from_threshold(F, amax, grid.qmax, prof.scale_convention)
        return fake_quantize(F, w, scale, grid.qmin, grid.qmax, None, prof.rounding, prof.scale_convention,
                             mask_clipped=False)

    # ------------------------------------------------------------------ NumPy views for exporters
    def input_range(self, lo: float, hi: float) -> tuple[float, float]:
        """The input range the exporters write, from the tracked (or calibrated) ``(lo, hi)``: what
        :meth:`input_quant_range` computes from it in inference."""
        if type(self).input_quant_range is Quantizer.input_quant_range:
            return lo, hi
        params = {k: v.data() for k, v in self.layer._reg_params.items()}
        ql, qh = self.input_quant_range(mx.nd, mx.nd.array([lo]), mx.nd.array([hi]), params)
        return float(np.float32(ql.asnumpy()[0])), float(np.float32(qh.asnumpy()[0]))

    def set_input_range(self, lo: float, hi: float) -> None:
        """A calibrated input range was set (the layer's state holds it); update parameters derived from it."""

    def weight_step(self, w: mx.nd.NDArray, params: dict[str, mx.nd.NDArray]) -> np.ndarray:
        """The grid step of each output channel (float32 (O,)) of the BN-folded weight ``w``: the codes are
        ``quantize_weight(w) / step``."""
        grid = self.config.weight
        amax = self.weight_absmax(mx.nd, w).asnumpy().reshape(-1)
        return np.broadcast_to(amax / (grid.qmax if grid else 127), (w.shape[0],)).astype(np.float32)

    def weight_threshold(self, wf: np.ndarray, step: np.ndarray) -> np.ndarray:
        """The per-output-channel threshold the exporters record for the weight: by default max|W_f| over the
        channel's quantization unit (the layer, its group or the channel itself, :meth:`units`)."""
        a = np.abs(wf.reshape(wf.shape[0], -1))
        units = self.units() if self.config.weight is not None else a.shape[0]
        return np.repeat(a.reshape(units, -1).max(1), a.shape[0] // units).astype(np.float32)
