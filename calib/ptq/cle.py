"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1) on a deployq-quantized net.

For a pair layer 1 -> (ReLU) -> layer 2 where layer 1's output (BN folded) feeds only the ReLU and the ReLU
only layer 2 (or layer 1 feeds layer 2 directly), channel i of layer 1's output is divided by
``s_i = sqrt(r1_i r2_i) / r2_i`` and layer 2's input channel i multiplied by it (``r1_i``: max|W1_f| of
output channel i, ``r2_i``: max|W2_f| over input channel i), so both ranges become ``sqrt(r1_i r2_i)``. ReLU is
positively homogeneous (``relu(x / s) = relu(x) / s``), so the fp32 outputs do not change. ReLU6 is not: by
Nagel's rule it would have to be replaced by ReLU (changing the fp32 net), so pairs across ReLU6 (and any other
activation) are left alone. Layer 2 is a Conv2D with one group, a depthwise Conv2D or a Dense on a 2-D input.
Sweeps repeat over all pairs until the scales converge (chains such as MobileNet's dw -> pw -> dw). Run it
before calibration: the input ranges change.

On per-channel weight grids (ncnn, Tengine, custom's default) equalizing gains nothing on layer 1's own grid,
and unguarded it did harm: a BN-folded dead channel (moving_var ~ 0) has huge folded weights, and its scale blew
up layer 2's column (mobilenet0.25 W4A8 on MNIST-5k: 0.874 -> 0.336). There, ``1 <= s_i`` and ``s_i`` never
raises any output channel's max |W2| (see :func:`equalize`); with per-tensor weights the scales are Nagel's.
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from .layers import fp32_graph

_WEIGHTED = ("Convolution", "FullyConnected")


def _depthwise(node: Any, w: np.ndarray) -> bool:
    return node.op == "Convolution" and int(node.attrs["num_group"]) > 1 and w.shape[1] == 1 \
        and int(node.attrs["num_group"]) == w.shape[0]


def equalization_pairs(qnet: gluon.HybridBlock, g: Any) -> list[tuple[str, str]]:
    """(layer 1, layer 2) paths that :func:`equalize` scales (see the module docstring)."""
    from deployq.api import quant_layers

    q = quant_layers(qnet)
    pairs = []
    for n in g.nodes:
        if n.name not in q or n.op not in _WEIGHTED:
            continue
        b1 = q[n.name]
        if n.attrs.get("folded_bn") and (b1._dq_bn_kwargs is None or b1._dq_bn_kwargs.get("fix_gamma", False)):
            continue  # a BatchNorm the layer does not own: its statistics would not scale
        t = n.output
        cons = g.consumers(t)
        if t in g.outputs or len(cons) != 1:
            continue
        nxt = cons[0]
        if nxt.op == "Activation" and nxt.attrs.get("act_type") == "relu":
            t = nxt.output
            cons = g.consumers(t)
            if t in g.outputs or len(cons) != 1:
                continue
            nxt = cons[0]
        if nxt.name not in q or nxt.op not in _WEIGHTED or nxt.inputs[0] != t:
            continue
        w2 = g.param(nxt, "weight")
        if nxt.op == "Convolution" and int(nxt.attrs["num_group"]) != 1 and not _depthwise(nxt, w2):
            continue
        if nxt.op == "FullyConnected" and w2.shape[1] != g.param(n, "weight").shape[0]:
            continue  # a Dense that flattens a feature map
        pairs.append((n.name, nxt.name))
    return pairs


def _scale_rows(blk: Any, s: np.ndarray) -> None:
    """Divide output channel i of ``blk`` (BN folded) by ``s_i``."""
    if blk._dq_bn_kwargs is not None:
        for name in ("bn_gamma", "bn_beta"):
            prm = blk._reg_params[name]
            prm.set_data(prm.data() / mx.nd.array(s))
        return
    w = blk.weight.data().asnumpy()
    blk.weight.set_data(mx.nd.array(w / s.reshape((-1,) + (1,) * (w.ndim - 1))))
    if blk.bias is not None:
        blk.bias.set_data(blk.bias.data() / mx.nd.array(s))


def _scale_inputs(blk: Any, s: np.ndarray, depthwise: bool) -> None:
    """Multiply input channel i of ``blk`` by ``s_i`` (its weight's axis 1; a depthwise conv's axis 0)."""
    w = blk.weight.data().asnumpy()
    shape = (-1,) + (1,) * (w.ndim - 1) if depthwise else (1, -1) + (1,) * (w.ndim - 2)
    blk.weight.set_data(mx.nd.array((w * s.reshape(shape)).astype(np.float32)))


def _ranges(blk1: Any, blk2: Any, depthwise: bool) -> tuple[np.ndarray, np.ndarray]:
    w1, _ = blk1.folded_weight_bias()
    w2, _ = blk2.folded_weight_bias()
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(1)
    r2 = np.abs(w2.reshape(w2.shape[0], -1)).max(1) if depthwise else \
        np.abs(np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)).max(1)
    return r1.astype(np.float64), r2.astype(np.float64)


def _column_bound(blk: Any) -> np.ndarray:
    """Per input channel i, the largest factor column i of the BN-folded weight may be multiplied by without
    raising any output channel's max |W| (``min_j max_k |W[j, k]| / |W[j, i]|``)."""
    w, _ = blk.folded_weight_bias()
    a = np.abs(np.moveaxis(w, 1, -1).reshape(w.shape[0], -1, w.shape[1])).max(1).astype(np.float64)  # (O, I)
    row = a.max(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a > 0, row / np.where(a > 0, a, 1), np.inf)
    return ratio.min(0)


def equalize(qnet: gluon.HybridBlock, image_shape: tuple[int, ...], sweeps: int = 20, tol: float = 1e-4,
             max_scale: float = 16.0) -> dict[str, Any]:
    """Equalize every pair of :func:`equalization_pairs` in place; returns ``{"pairs": [...], "sweeps": n,
    "balance": {layer 2: (before, after)}}`` (:func:`_balance` of the two layers' channel ranges).

    Scales stay within [1 / max_scale, max_scale]. Where both layers have per-channel (or per-group) weight
    grids, equalizing a channel gains nothing on layer 1's own grid and can only cost elsewhere (a BN-folded
    dead channel has huge folded weights), so there ``1 <= s_i`` (no input channel of layer 2 grows) and
    ``s_i`` never raises layer 2's max |W| of any output channel (its step)."""
    from deployq.api import _clear_cache, quant_layers

    g = fp32_graph(qnet, image_shape)
    q = quant_layers(qnet)
    pairs = equalization_pairs(qnet, g)
    dw = {b: _depthwise(g.node(b), g.param(g.node(b), "weight")) for _, b in pairs}
    per_unit = {p: q[p].layer_config.weight is not None and q[p].layer_config.weight.granularity != "layer"
                for pair in pairs for p in pair}
    before = {b: _balance(*_ranges(q[a], q[b], dw[b])) for a, b in pairs}
    done = 0
    while done < sweeps:
        done += 1
        worst = 0.0
        for a, b in pairs:
            r1, r2 = _ranges(q[a], q[b], dw[b])
            ok = (r1 > 0) & (r2 > 0)
            s = np.where(ok, np.sqrt(r1 * r2) / np.where(ok, r2, 1), 1.0)
            if per_unit[a] and per_unit[b]:  # per-channel grids: never coarsen a step nor grow an input channel
                s = np.maximum(s, 1.0)
                if not dw[b]:
                    s = np.minimum(s, _column_bound(q[b]))
            s = np.clip(s, 1.0 / max_scale, max_scale)
            worst = max(worst, float(np.abs(np.log(s)).max()) if len(s) else 0.0)
            _scale_rows(q[a], s.astype(np.float32))
            _scale_inputs(q[b], s.astype(np.float32), dw[b])
        if worst < tol:
            break
    _clear_cache(qnet)
    after = {b: _balance(*_ranges(q[a], q[b], dw[b])) for a, b in pairs}
    return {"pairs": pairs, "sweeps": done, "balance": {b: (before[b], after[b]) for _, b in pairs}}


def _balance(r1: np.ndarray, r2: np.ndarray) -> float:
    """Mean over channels of min(r1/max r1, r2/max r2): 1 when every channel uses its layer's full range."""
    if not len(r1) or r1.max() <= 0 or r2.max() <= 0:
        return 0.0
    return float(np.mean(np.minimum(r1 / r1.max(), r2 / r2.max())))
