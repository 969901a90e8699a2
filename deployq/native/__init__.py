"""Fused fake-quantization operators (``fakequant.cc``), MXNet ``lib_api`` operators loaded with
``mx.library.load``.

They compute what ``deployq.fakequant`` and ``deployq.blocks`` compute with MXNet operators, bit for bit in the
forward, in one pass per tensor instead of ~30 small operators per layer (QAT on CPU is dominated by operator
overhead otherwise). Every native library (this one, ``calibops``, ``rawstats``) is compiled when deployq is
installed, next to this file (``deployq/native/build.py``; by hand: ``python -m deployq.native``). Where a
library was not built (no compiler at install) or is out of date (its build key differs: other sources, MXNet
version or CPU flags), deployq prints one warning line and uses its fallback: same results, slower.
``DEPLOYQ_NATIVE=0`` turns the native code off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

from . import build

OPS = ("dq_act_quant", "dq_weight_quant", "dq_bn_stats", "dq_bn_fold")


def enabled() -> bool:
    """False when ``DEPLOYQ_NATIVE=0`` turns the native code off."""
    return os.environ.get("DEPLOYQ_NATIVE", "1") != "0"


def library_problem(lib: build.Library) -> str | None:
    """Why the installed library ``lib`` cannot be used ("not built", "does not load: ...", "out of date"), or
    None when it can."""
    path = build.target(lib)
    if not path.exists():
        return "not built"
    try:
        get_key = ctypes.CDLL(str(path)).dq_build_key
    except (OSError, AttributeError) as e:
        return f"does not load: {e}"
    get_key.restype = ctypes.c_char_p
    if get_key().decode() != build.key(lib):
        return "out of date (built from other sources, MXNet or CPU flags)"
    return None


@functools.cache
def warn(message: str) -> None:
    """Print ``message`` as one warning line on stderr, once per process."""
    print(f"deployq: warning: {message}", file=sys.stderr, flush=True)


def installed_library(stem: str, without: str) -> Path | None:
    """The path of the installed, up-to-date library ``stem``; None when it cannot be used, after one warning line
    naming why, the fallback and how to rebuild (libraries that were not built share one line)."""
    lib = build.library(stem)
    problem = library_problem(lib)
    if problem is None:
        return build.target(lib)
    if problem == "not built":
        warn(f"deployq's native libraries were not built at install ({build.target(lib).parent}/*.so missing); "
             f"using the NumPy/MXNet fallback (same results, slower QAT and calibration); build them with: "
             f"{build.REBUILD}")
    else:
        warn(f"{build.target(lib).name} {problem}; {without}; rebuild with: {build.REBUILD}")
    return None


def load_operators(stem: str, ops: tuple[str, ...], without: str) -> bool:
    """Load the installed operator library ``stem`` (once); True when ``ops`` are registered. ``without``: what
    deployq does instead, for the warning."""
    if not enabled():
        return False
    import mxnet as mx

    if all(hasattr(mx.nd, op) and hasattr(mx.sym, op) for op in ops):
        return True
    path = installed_library(stem, without)
    if path is None:
        return False
    try:
        mx.library.load(str(path), False)
    except (OSError, mx.base.MXNetError) as e:
        warn(f"{path.name} does not load ({str(e).splitlines()[0]}); {without}")
        return False
    return all(hasattr(mx.nd, op) and hasattr(mx.sym, op) for op in ops)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the fused operators are loaded; False (with one warning line) otherwise."""
    return load_operators("libdeployq_fakequant", OPS, "using MXNet operators (same results, slower QAT)")
