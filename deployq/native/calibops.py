"""The fused calibration operator (``calibops.cc``: ``dq_calib_stats``), built and loaded like the fake-quant
operators (``deployq.native``) but as a library of its own, keyed by a hash of its source.

deployq.calib uses it to reduce every tapped activation inside the graph (min/max, EMA clipped counts, histograms
of |x|) instead of reading the tensors on the host; without a compiler (or with ``DEPLOYQ_NATIVE=0``) calibration
reads the tensors and computes the same numbers in NumPy.
"""

from __future__ import annotations

import functools
from pathlib import Path

from . import avx512_flags, load_library

SOURCE = Path(__file__).with_name("calibops.cc")
OP = "dq_calib_stats"


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when ``dq_calib_stats`` is loaded (built on first use); False (with one warning) otherwise."""
    return load_library(SOURCE, "libdeployq_calibops", (OP,),
                        "reading activations on the host (same results, slower calibration)", avx512_flags())
