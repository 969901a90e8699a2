"""Normalising passes: rewrite MXNet idioms into the IR's canonical ops before any engine sees the graph.

One pass per module, each a ``Graph -> Graph`` function that keeps the fp32 outputs (checked by
``tests/exporters/test_normalize.py`` against MXNet). :func:`normalize` runs them in order.
"""

from __future__ import annotations

from deployq.exporters.ir.graph import Graph
from deployq.exporters.ir.normalize.adaptive_pool import adaptive_to_pooling
from deployq.exporters.ir.normalize.constants import fold_ones_like
from deployq.exporters.ir.normalize.hardswish import fuse_hard_swish
from deployq.exporters.ir.normalize.pad import fold_pad
from deployq.exporters.ir.normalize.reshapes import canonical_reshapes
from deployq.exporters.ir.normalize.shuffle import fuse_channel_shuffle

PASSES = (fold_ones_like, adaptive_to_pooling, canonical_reshapes, fuse_channel_shuffle, fuse_hard_swish, fold_pad)


def normalize(g: Graph) -> Graph:
    """Every normalising pass, in order."""
    for p in PASSES:
        g = p(g)
    return g


__all__ = ["PASSES", "adaptive_to_pooling", "canonical_reshapes", "fold_ones_like", "fold_pad",
           "fuse_channel_shuffle", "fuse_hard_swish", "normalize"]
