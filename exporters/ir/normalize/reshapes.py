"""Shape-only ops resolved on the IR: ``expand_dims`` and ``Reshape`` (MXNet's special codes 0/-1/-2/-3/-4)
become ``Reshape`` to an explicit per-image shape, chains collapse, identities vanish."""

from __future__ import annotations

from deployq.exporters.ir.graph import Graph
from deployq.exporters.ir.mxnet_lower import tensor_shapes

SHAPE_OPS = ("Reshape", "expand_dims")


def canonical_reshapes(g: Graph) -> Graph:
    """Each ``Reshape``/``expand_dims`` that keeps the batch axis (checked at batch 1 and 2) becomes
    ``Reshape(shape=(0, *per_image))``; a reshape of a single-use reshape reads the first one's input; a
    reshape to its own input shape is removed. A reshape that mixes the batch axis is left as it is."""
    if not any(n.op in SHAPE_OPS for n in g.nodes):
        return g
    g = g.copy()
    s1, s2 = tensor_shapes(g), tensor_shapes(g, batch=2)
    for n in [n for n in g.nodes if n.op in SHAPE_OPS]:
        out1, out2, in1 = s1[n.output], s2[n.output], s1[n.inputs[0]]
        if out1[0] != 1 or out2[0] != 2 or out2[1:] != out1[1:]:
            continue
        n.op, n.attrs = "Reshape", {"shape": (0, *out1[1:]), "reverse": False}
        src = g.producer(n.inputs[0])
        if src is not None and src.op == "Reshape" and src.attrs["shape"][:1] == (0,) and g.n_uses(src.output) == 1:
            n.inputs = [src.inputs[0]]
            in1 = s1[src.inputs[0]]
            g.remove(src)
        if tuple(in1) == tuple(out1):
            g.replace_uses(n.output, n.inputs[0])
            g.remove(n)
    return g
