"""A BatchNorm that cannot be folded (pre-activation nets: BN after an add or the input) as a per-channel
1x1 depthwise convolution, which Tengine runs in int8 (its BatchNorm has no int8 kernel, spec §2.5)."""

from __future__ import annotations

import numpy as np
from deployq.exporters.ir.graph import Graph
from deployq.exporters.ir.mxnet_lower import tensor_shapes


def batchnorm_as_depthwise(g: Graph) -> Graph:
    """Every remaining channel BatchNorm on a 4-D tensor -> ``Convolution(kernel 1x1, num_group = C)`` with
    ``w[c] = gamma[c] / sqrt(var[c] + eps)`` and ``b[c] = beta[c] - mean[c] * w[c]``; the node keeps the
    BatchNorm's name (and so its output tensor's). Run :func:`passes.mark_fusable_activations` after it."""
    bns = [n for n in g.nodes if n.op == "BatchNorm" and n.attrs["axis"] == 1]
    if not bns:
        return g
    g = g.copy()
    shapes = tensor_shapes(g)
    for bn in [g.node(b.name) for b in bns]:
        if len(shapes[bn.inputs[0]]) != 4:
            continue
        gamma = g.param(bn, "gamma")
        gamma = np.ones_like(gamma) if bn.attrs["fix_gamma"] else gamma
        inv = gamma.astype(np.float64) / np.sqrt(g.param(bn, "moving_var").astype(np.float64) + bn.attrs["eps"])
        bias = g.param(bn, "beta").astype(np.float64) - g.param(bn, "moving_mean").astype(np.float64) * inv
        c = int(gamma.size)
        for key in bn.params.values():
            g.params.pop(key, None)
        wkey, bkey = f"{bn.name}.dw_weight", f"{bn.name}.dw_bias"
        g.params[wkey] = inv.astype(np.float32).reshape(c, 1, 1, 1)
        g.params[bkey] = bias.astype(np.float32)
        bn.op, bn.params = "Convolution", {"weight": wkey, "bias": bkey}
        bn.attrs = {"kernel": (1, 1), "stride": (1, 1), "dilate": (1, 1), "pad": (0, 0), "num_filter": c,
                    "num_group": c, "no_bias": False, "layout": "None", "from_batchnorm": True}
    return g
