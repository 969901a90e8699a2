"""Channel shuffle (``Reshape`` to (g, C/g, H, W), ``SwapAxis(1, 2)``, ``Reshape`` back) -> ShuffleChannel."""

from __future__ import annotations

from deployq.exporters.ir.graph import Graph
from deployq.exporters.ir.mxnet_lower import tensor_shapes


def fuse_channel_shuffle(g: Graph) -> Graph:
    """Run after :func:`canonical_reshapes`: the three nodes become one ``ShuffleChannel(group=g)`` that keeps
    the last node's name (so downstream tensor names do not change)."""
    if not any(n.op == "SwapAxis" for n in g.nodes):
        return g
    g = g.copy()
    shapes = tensor_shapes(g)
    for sw in [n for n in g.nodes if n.op == "SwapAxis"]:
        if sorted((sw.attrs["dim1"], sw.attrs["dim2"])) != [1, 2] or g.n_uses(sw.output) != 1:
            continue
        first = g.producer(sw.inputs[0])
        (last,) = g.consumers(sw.output) or [None]
        if first is None or last is None or first.op != "Reshape" or last.op != "Reshape":
            continue
        if g.n_uses(first.output) != 1:
            continue
        x = first.inputs[0]
        xs, mid, ys = shapes[x], shapes[first.output], shapes[last.output]
        if len(xs) != 4 or len(mid) != 5 or tuple(ys) != tuple(xs) or mid[1] * mid[2] != xs[1] or mid[3:] != xs[2:]:
            continue
        last.op, last.inputs, last.attrs = "ShuffleChannel", [x], {"group": int(mid[1])}
        g.remove(sw)
        g.remove(first)
    return g
