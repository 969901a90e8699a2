"""Hard-sigmoid / hard-swish written with scalar ops and clip (gluoncv's mobilenetv3) -> one op each."""

from __future__ import annotations

from deployq.exporters.ir.graph import Graph, Node


def _single_use(g: Graph, t: str) -> bool:
    return g.n_uses(t) == 1


def _hard_sigmoid_chain(g: Graph, div: Node) -> tuple[str, float, float, list[Node]] | None:
    """``clip(x + b, 0, c) / c`` (or ``* (1/c)``) -> (x, alpha = 1/c, beta = b/c, nodes of the chain)."""
    if div.op == "_div_scalar":
        c = div.attrs["scalar"]
    elif div.op == "_mul_scalar" and div.attrs["scalar"] != 0:
        c = 1.0 / div.attrs["scalar"]
    else:
        return None
    clip = g.producer(div.inputs[0])
    if clip is None or clip.op != "clip" or not _single_use(g, clip.output):
        return None
    if clip.attrs["a_min"] != 0.0 or clip.attrs["a_max"] != c or c <= 0:
        return None
    plus = g.producer(clip.inputs[0])
    if plus is None or plus.op != "_plus_scalar" or not _single_use(g, plus.output):
        return None
    return plus.inputs[0], 1.0 / c, plus.attrs["scalar"] / c, [plus, clip]


def fuse_hard_swish(g: Graph) -> Graph:
    """``clip(x+3, 0, 6) / 6`` -> ``HardSigmoid(x)`` (alpha 1/6, beta 0.5, from the scalars), and
    ``x * HardSigmoid(x)`` (elemwise or broadcast mul) -> ``HardSwish(x)``. The last node keeps its name."""
    g = g.copy()
    for n in list(g.nodes):
        if n.op not in ("_div_scalar", "_mul_scalar") or n not in g.nodes:
            continue
        found = _hard_sigmoid_chain(g, n)
        if found is None:
            continue
        x, alpha, beta, chain = found
        for m in chain:
            g.remove(m)
        n.op, n.inputs, n.attrs = "HardSigmoid", [x], {"alpha": alpha, "beta": beta}
    for n in list(g.nodes):
        if n.op not in ("elemwise_mul", "broadcast_mul") or len(n.inputs) != 2:
            continue
        for i in (0, 1):
            hs = g.producer(n.inputs[i])
            if (hs is not None and hs.op == "HardSigmoid" and hs.inputs[0] == n.inputs[1 - i]
                    and _single_use(g, hs.output)):
                n.op, n.inputs, n.attrs = "HardSwish", [n.inputs[1 - i]], dict(hs.attrs)
                g.remove(hs)
                break
    return g
