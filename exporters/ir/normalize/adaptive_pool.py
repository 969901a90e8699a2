"""Adaptive average pooling whose windows are fixed: to global pooling (1x1) or an ordinary Pooling."""

from __future__ import annotations

from deployq.exporters.ir.graph import Graph
from deployq.exporters.ir.mxnet_lower import tensor_shapes


def adaptive_to_pooling(g: Graph) -> Graph:
    """``_contrib_AdaptiveAvgPooling2D``: output 1x1 -> global average Pooling; an output size that divides
    the input size -> Pooling with kernel = stride = in/out (MXNet's windows are then exactly those).
    Other sizes stay (exporters lower them to adaptive pooling or refuse)."""
    nodes = [n for n in g.nodes if n.op == "_contrib_AdaptiveAvgPooling2D"]
    if not nodes:
        return g
    g = g.copy()
    shapes = tensor_shapes(g)
    for n in [g.node(m.name) for m in nodes]:
        oh, ow = n.attrs["output_size"]
        h, w = shapes[n.inputs[0]][2:]
        base = {"pool_type": "avg", "pooling_convention": "valid", "count_include_pad": None, "layout": "None"}
        if (oh, ow) == (1, 1):
            n.op, n.attrs = "Pooling", {**base, "kernel": (1, 1), "stride": (1, 1), "pad": (0, 0),
                                        "global_pool": True}
        elif h % oh == 0 and w % ow == 0:
            k = (h // oh, w // ow)
            n.op, n.attrs = "Pooling", {**base, "kernel": k, "stride": k, "pad": (0, 0), "global_pool": False}
    return g
