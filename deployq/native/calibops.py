"""The fused calibration operator (``calibops.cc``: ``dq_calib_stats``), built at install and loaded like the
fake-quant operators (``deployq.native``), as a library of its own.

deployq.calib uses it to reduce every tapped activation inside the graph (min/max, EMA clipped counts, histograms
of |x|) instead of reading the tensors on the host; without a compiler (or with ``DEPLOYQ_NATIVE=0``) calibration
reads the tensors and computes the same numbers in NumPy.
"""

from __future__ import annotations

import functools

from . import load_operators

OP = "dq_calib_stats"


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when ``dq_calib_stats`` is loaded; False (with one warning line) otherwise."""
    return load_operators("libdeployq_calibops", (OP,),
                          "calibration reads activations on the host (same results, slower)")
