"""EasyQuant (``eq``) as ncnn2table's ``QuantNet::quantize_EQ``: KL thresholds first, then, layer by layer, a
search of the input scale that maximises the cosine similarity between the layer's fp32 output and its
int8 output.

For every quantized layer independently (fp32 inputs of the whole net, at most ``eq_images`` = 50 images):
candidates ``s_k = lo + k (hi - lo) / 100``, k = 0 .. 99, with ``lo = 0.5 s``, ``hi = 2 s`` around the KL
scale ``s = qmax / T`` (ncnn's multiplier); for each, the layer runs on the input quantized with ``s_k`` and
its weights on the layer's weight grid, and the cosine similarity with the fp32 output (both after the
activation the IR fuses into the layer, as ncnn's fused layer outputs) is summed over the images; the first
maximum wins, the threshold becomes ``qmax / s_k``. The initial KL is ncnn2table's (no clip guard;
``max_clipped_share`` sets one).

ncnn2table also searches each weight scale the same way; deployq's weight grids stay max-abs (every exporter
recovers the step from max|W|), so only the input scales are searched here.
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np

from ..fakequant import np_round_half_away
from ..profiles import Profile, TensorGrid
from .base import register
from .kl import KL_EPS, KLCalibrator
from .scalefile import ScaleFile, TensorRange


def cosine_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum over images of the cosine similarity of each image's whole output (ncnn's ``cosine_similarity``)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    den = np.sqrt((a * a).sum(1)) * np.sqrt((b * b).sum(1))
    return float(np.sum(np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)))


def _weight_grid(net: Any, path: str, node: Any, prof: Profile) -> TensorGrid | None:
    """The layer's weight grid: its own in a quantized net, else the profile's (6-bit 3x3 rule included)."""
    from deployq.api import quant_layers

    q = quant_layers(net)
    if q:
        return q[path].layer_config.weight if path in q else None
    g = prof.weight
    a = node.attrs
    if (prof.winograd_3x3 == "six_bit" and node.op == "Convolution" and tuple(a["kernel"]) == (3, 3)
            and tuple(a["stride"]) == (1, 1) and tuple(a["dilate"]) == (1, 1) and int(a["num_group"]) == 1):
        from dataclasses import replace

        g = replace(g, bits=min(g.bits, 6))
    return g


def quantize_weight_np(w: np.ndarray, grid: TensorGrid | None, groups: int, prof: Profile) -> np.ndarray:
    """``w`` on its symmetric max-abs grid (per channel; per group for 1 < groups < channels; per layer)."""
    if grid is None:
        return w
    o = w.shape[0]
    flat = np.abs(w.reshape(o, -1))
    if grid.granularity == "layer":
        amax = np.full(o, flat.max())
    elif grid.granularity == "group" and 1 < groups < o:
        amax = np.repeat(flat.reshape(groups, -1).max(1), o // groups)
    else:
        amax = flat.max(1)
    amax = amax.astype(np.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    safe = np.where(amax > 0, amax, np.float32(1))
    if prof.scale_convention == "multiplier":
        m = np.float32(grid.qmax) / safe
        return (np.clip(np_round_half_away(w * m), grid.qmin, grid.qmax) / m).astype(np.float32)
    s = safe / np.float32(grid.qmax)
    r = np_round_half_away(w / s) if prof.rounding == "half_away_from_zero" else np.rint(w / s)
    return (np.clip(r, grid.qmin, grid.qmax) * s).astype(np.float32)


def _fake_input(x: np.ndarray, m: float, grid: TensorGrid) -> np.ndarray:
    """``x`` on the symmetric input grid with multiplier ``m`` (ncnn: ``float2int8(x * scale)``)."""
    m32 = np.float32(m)
    return (np.clip(np_round_half_away(x * m32), grid.qmin, grid.qmax) / m32).astype(np.float32)


@register
class EQCalibrator(KLCalibrator):
    """KL per tensor, then :meth:`refine` searches each layer's input scale (``eq_images``, ``steps``,
    ``lower``, ``upper`` as ncnn2table: 50, 100, 0.5, 2.0)."""

    name = "eq"

    def __init__(self, grid: TensorGrid | None = None, num_bins: int = 2048, eps: float = KL_EPS,
                 max_clipped_share: float | None = None, eq_images: int = 50, steps: int = 100,
                 lower: float = 0.5, upper: float = 2.0):
        super().__init__(grid, num_bins, eps, max_clipped_share)
        if eq_images < 1 or steps < 1 or not 0 < lower < upper:
            raise ValueError(f"EasyQuant: need eq_images >= 1, steps >= 1, 0 < lower < upper (got {eq_images}, "
                             f"{steps}, {lower}, {upper})")
        self.eq_images, self.steps, self.lower, self.upper = int(eq_images), int(steps), float(lower), float(upper)

    def refine(self, net: Any, data: Any, sf: ScaleFile, grids: dict[str, TensorGrid], prof: Profile,
               batch_size: int = 64) -> None:
        """Replace each ``<layer>:input`` threshold of ``sf`` (KL's) by the EasyQuant search's."""
        from .api import iter_batches
        from .ptq.layers import activation_of, fp32_graph, fp32_tensors, layer_forward

        xs, n = [], 0
        for b in iter_batches(data, batch_size):
            a = b.asnumpy() if isinstance(b, mx.nd.NDArray) else np.asarray(b, np.float32)
            xs.append(a[: self.eq_images - n])
            n += len(xs[-1])
            if n >= self.eq_images:
                break
        x = np.concatenate(xs).astype(np.float32)
        g = fp32_graph(net, x.shape[1:])
        keys = {r.layer: k for k, r in sf.tensors.items() if r.kind == "input" and r.layer}
        nodes = {p: g.node(p) for p in keys}
        acts = fp32_tensors(g, x, [t for nd in nodes.values() for t in (nd.inputs[0], nd.output)])
        for path, key in keys.items():
            r, node, grid = sf.tensors[key], nodes[path], grids.get(path, prof.activation)
            if r.threshold <= 0 or not grid.symmetric:
                continue
            act = activation_of(node)
            w = g.param(node, "weight")
            b = g.param(node, "bias")
            groups = int(node.attrs.get("num_group", 1))
            wq = mx.nd.array(quantize_weight_np(w, _weight_grid(net, path, node, prof), groups, prof))
            bb = None if b is None else mx.nd.array(b)
            xin = acts[node.inputs[0]]
            if grid.signed is False:
                xin = np.maximum(xin, 0)
            ref = layer_forward(mx.nd, node, mx.nd.array(xin), mx.nd.array(w), bb, act).asnumpy()
            scale = np.float32(grid.qmax / r.threshold)
            lo, hi = scale * np.float32(self.lower), scale * np.float32(self.upper)
            step = (hi - lo) / np.float32(self.steps)
            best, best_scale = 0.0, float(scale)
            for k in range(self.steps):
                s_k = float(lo + np.float32(k) * step)
                out = layer_forward(mx.nd, node, mx.nd.array(_fake_input(xin, s_k, grid)), wq, bb, act).asnumpy()
                sim = cosine_sum(ref, out)
                if best < sim:
                    best, best_scale = sim, s_k
            t = float(np.float32(grid.qmax) / np.float32(best_scale))
            lo_r = -t if grid.signed else 0.0
            sf.tensors[key] = TensorRange.on_grid(
                r.layer, r.kind, r.tensor, "eq", t, lo_r, t, grid, samples=r.samples, data_hash=r.data_hash,
                observed_min=r.observed_min, observed_max=r.observed_max,
                clipped_share=0.0 if r.observed_absmax is not None and t >= r.observed_absmax else None)
