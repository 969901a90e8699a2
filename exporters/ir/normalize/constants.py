"""Constants made from a tensor's shape (``ones_like``) folded into scalar ops."""

from __future__ import annotations

from deployq.exporters.ir.graph import Graph, Node


def fold_ones_like(g: Graph) -> Graph:
    """``elemwise_add(ones_like(a), y)`` -> ``_plus_scalar(y, 1)`` and ``elemwise_mul(ones_like(a), y)`` -> ``y``
    (same shapes, as elemwise ops require); the ``ones_like`` node goes once unused."""
    if not any(n.op == "ones_like" for n in g.nodes):
        return g
    g = g.copy()
    ones = {n.output for n in g.nodes if n.op == "ones_like"}
    for n in list(g.nodes):
        if n.op not in ("elemwise_add", "elemwise_mul") or len(n.inputs) != 2:
            continue
        k = [i for i, t in enumerate(n.inputs) if t in ones]
        if len(k) != 1:
            continue
        other = n.inputs[1 - k[0]]
        if n.op == "elemwise_add":
            n.op, n.inputs, n.attrs = "_plus_scalar", [other], {"scalar": 1.0}
        else:
            g.replace_uses(n.output, other)
            g.remove(n)
    for t in ones:
        node: Node | None = g.producer(t)
        if node is not None and g.n_uses(t) == 0:
            g.remove(node)
    return g
