"""Min-max ranges of every activation tensor of an IR graph over calibration batches."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from deployq.exporters.ir.graph import Graph
from deployq.exporters.ir.mxnet_lower import run_symbol, to_symbol


def tensor_ranges(graph: Graph, batches: Iterable[np.ndarray]) -> dict[str, tuple[float, float]]:
    """``{tensor: (lo, hi)}`` over all batches (NCHW float32 images), input ``data`` included.

    A plain min-max; ``deployq.calib`` offers KL / percentile / MSE thresholds on top of the same tensors.
    """
    names = graph.tensors()
    sym, args, aux = to_symbol(graph, outputs=names)
    lo = {t: np.inf for t in names}
    hi = {t: -np.inf for t in names}
    for xb in batches:
        for t, v in zip(names, run_symbol(sym, args, aux, np.asarray(xb, np.float32)), strict=True):
            lo[t] = min(lo[t], float(v.min()))
            hi[t] = max(hi[t], float(v.max()))
    if not names or lo[names[0]] == np.inf:
        raise ValueError(f"{graph.name}: no calibration batches")
    return {t: (lo[t], hi[t]) for t in names}
