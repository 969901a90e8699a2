"""Zero ``Pad`` on the spatial axes folded into the following convolution's (or count-including average
pooling's) symmetric pads."""

from __future__ import annotations

from deployq.exporters.ir.graph import Graph


def spatial_pads(pad_width: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` of an NCHW ``pad_width`` that pads only H and W, else None."""
    if len(pad_width) != 8 or any(pad_width[:4]):
        return None
    return pad_width[4], pad_width[5], pad_width[6], pad_width[7]


def fold_pad(g: Graph) -> Graph:
    """``Pad(constant 0, top=bottom, left=right)`` whose only consumer is a Convolution, or an average
    Pooling counting pads, is removed and its pads added to the consumer's ``pad``."""
    g = g.copy()
    for p in [n for n in g.nodes if n.op == "Pad"]:
        pads = spatial_pads(p.attrs["pad_width"])
        if (pads is None or p.attrs["mode"] != "constant" or p.attrs["constant_value"] != 0.0
                or pads[0] != pads[1] or pads[2] != pads[3] or g.n_uses(p.output) != 1):
            continue
        (c,) = g.consumers(p.output)
        ok = c.op == "Convolution" or (c.op == "Pooling" and c.attrs["pool_type"] == "avg"
                                       and not c.attrs["global_pool"] and c.attrs["count_include_pad"] is not False)
        if not ok or c.inputs[0] != p.output or len(c.attrs["pad"]) != 2:
            continue
        c.attrs["pad"] = (c.attrs["pad"][0] + pads[0], c.attrs["pad"][1] + pads[2])
        g.replace_uses(p.output, p.inputs[0])
        g.remove(p)
    return g
