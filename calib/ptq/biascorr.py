"""Empirical bias correction (Nagel et al. 2019, §4.2; the empirical variant): per quantized layer, in network
order, the mean over the calibration images (and positions) of ``y_q - y_fp`` per output channel is subtracted
from the layer's BN-folded bias. ``y_q`` is the layer's output on its simulated input (every earlier layer
quantized and already corrected) with its quantized weights, ``y_fp`` the fp32 net's output of that layer
(before its activation). A layer with neither a bias nor a folded BatchNorm is left as it is."""

from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from deployq.progress import progress

from .layers import add_folded_bias, fp32_graph, fp32_tensors, layer_forward, simulated_input


def layer_errors(qnet: gluon.HybridBlock, g: Any, path: str, x: np.ndarray, y_fp: np.ndarray | None = None
                 ) -> np.ndarray:
    """Mean of ``y_q - y_fp`` per output channel of layer ``path`` over ``x``."""
    from deployq.api import quant_layers

    blk = quant_layers(qnet)[path]
    node = g.node(path)
    if y_fp is None:
        y_fp = fp32_tensors(g, x, [node.output])[node.output]
    xq = simulated_input(qnet, path, x)
    wq, _ = blk.quantized_weight()
    _, bf = blk.folded_weight_bias()
    y_q = layer_forward(mx.nd, node, mx.nd.array(xq), mx.nd.array(wq.reshape(g.param(node, "weight").shape)),
                        mx.nd.array(bf)).asnumpy()
    d = (y_q.astype(np.float64) - y_fp)
    return np.moveaxis(d, 1, 0).reshape(d.shape[1], -1).mean(1)


def bias_correction(qnet: gluon.HybridBlock, x: np.ndarray, layers: list[str] | None = None, quiet: bool = True,
                    reference: Any = None) -> dict[str, dict[str, float]]:
    """Correct the biases in place (see the module docstring); returns ``{layer: {"mean_abs_error_before",
    "corrected"}}``. ``x``: calibration images (the quantized net's input ranges must be set); ``reference``: the
    fp32 graph IR to match (default: the net's float graph now; the corrected biases change it)."""
    from deployq.api import _clear_cache, quant_layers

    g = reference if reference is not None else fp32_graph(qnet, x.shape[1:])
    q = quant_layers(qnet)
    todo = [p for p in q if layers is None or p in layers]
    out: dict[str, dict[str, float]] = {}
    bar = progress(total=len(todo), desc="bias correction", disable=quiet)
    for path in todo:
        err = layer_errors(qnet, g, path, x)
        ok = add_folded_bias(q[path], -err.astype(np.float32))
        _clear_cache(qnet)
        out[path] = {"mean_abs_error_before": float(np.abs(err).mean()), "corrected": float(ok)}
        bar.update(1)
    bar.close()
    return out
