"""``lsq``: Learned Step Size Quantization (Esser et al. 2020): the input and weight steps are trained."""

from __future__ import annotations

import math
from typing import Any

import mxnet as mx
import numpy as np

from ..fakequant import fake_quantize, grad_scale, scale_from_threshold
from .base import Quantizer


class LSQQuantizer(Quantizer):
    """Parameters ``input_lsq_step`` (1,) and ``weight_lsq_step`` (one per weight unit), gradients scaled by
    ``1 / sqrt(qmax * N)``. The input step starts at 0, meaning "the tracked threshold / qmax" until the first
    update; weight steps start at ``2 * mean|w| / sqrt(qmax)``. Steps are steps (``weight_convention``)."""

    name = "lsq"
    int32_bias = False
    weight_convention = "step"

    def create_params(self) -> None:
        cfg = self.config
        if cfg.input is not None:
            self.add_param("input_lsq_step", np.zeros(1, np.float32))
        if cfg.weight is not None:
            self.add_param("weight_lsq_step", self._weight_init(cfg.weight))

    def _weight_init(self, grid) -> np.ndarray:
        layer = self.layer
        if layer.weight._data is None:
            raise ValueError(f"layer {self.config.name}: weights are not initialised; initialise the net and run one "
                             f"forward (or load parameters) before deployq.quantize(algorithm='lsq')")
        a = np.abs(layer.folded_weight_bias()[0])
        if grid.granularity == "layer":
            m = np.array([a.mean()])
        elif grid.granularity == "group" and 1 < self.groups < a.shape[0]:
            m = a.reshape(self.groups, -1).mean(1)
        else:
            m = a.reshape(a.shape[0], -1).mean(1)
        return (2 * m / math.sqrt(grid.qmax)).astype(np.float32)

    def quantize_input(self, F, x, lo, hi, params: dict[str, Any]):
        grid, step = self.config.input, params.get("input_lsq_step")
        if step is None or not grid.symmetric:
            return super().quantize_input(F, x, lo, hi, params)
        thr = F.maximum(F.abs(lo), F.abs(hi)) if grid.signed else F.relu(hi)
        s0 = F.BlockGrad(scale_from_threshold(F, thr, grid.qmax, "step"))
        s = F.where(step > 0, step, s0)
        g = F.rsqrt(grid.qmax * F.cast(F.size_array(x), "float32"))
        s = F.broadcast_mul(s, g) + F.BlockGrad(s - F.broadcast_mul(s, g))
        return fake_quantize(F, x, s, grid.qmin, grid.qmax, None, self.profile.rounding, "step")

    def _unit_steps(self, F, s):
        if self.config.weight.granularity == "group" and 1 < self.groups < self.out_channels:
            s = F.repeat(s, repeats=self.out_channels // self.groups)
        return s

    def quantize_weight(self, F, w, params: dict[str, Any]):
        grid = self.config.weight
        s = F.reshape(self._unit_steps(F, params["weight_lsq_step"]), (-1,) + (1,) * (self.weight_ndim - 1))
        n = int(np.prod(self.layer.weight.shape)) // self.units()
        s = grad_scale(F, s, 1.0 / math.sqrt(grid.qmax * max(1, n)))
        return fake_quantize(F, w, s, grid.qmin, grid.qmax, None, self.profile.rounding, "step")

    # ------------------------------------------------------------------ NumPy views
    def input_range(self, lo: float, hi: float) -> tuple[float, float]:
        prm = getattr(self.layer, "input_lsq_step", None)
        s = float(prm.data().asnumpy()[0]) if prm is not None else 0.0
        if s <= 0:
            return lo, hi
        t = s * self.config.input.qmax
        return (-t if self.config.input.signed else 0.0), t

    def set_input_range(self, lo: float, hi: float) -> None:
        prm = getattr(self.layer, "input_lsq_step", None)
        if prm is not None:
            grid = self.config.input
            t = max(abs(lo), abs(hi)) if grid.signed else max(hi, 0.0)
            prm.set_data(mx.nd.array([t / grid.qmax]))

    def weight_step(self, w: mx.nd.NDArray, params: dict[str, mx.nd.NDArray]) -> np.ndarray:
        s = self._unit_steps(np, params["weight_lsq_step"].asnumpy())
        return np.broadcast_to(s, (w.shape[0],)).astype(np.float32)

    def weight_threshold(self, wf: np.ndarray, step: np.ndarray) -> np.ndarray:
        return (step * self.config.weight.qmax).astype(np.float32)
