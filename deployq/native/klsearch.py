"""ncnn2table's KL threshold search in C++ (``klsearch.cc``: ``dq_kl_divergences``), ~20x faster than
:func:`deployq.calib.kl.kl_divergences_numpy`, whose formula it computes (values equal to ~1e-14 absolute).

A plain C library (ctypes, no MXNet headers) built with the system compiler on first use and cached like the other
native libraries (per source and CPU flags: AVX-512 or AVX2 paths where the CPU also has FMA, else scalar; the
logarithm's FMAs are the same operations on every path). Without a compiler, or with ``DEPLOYQ_NATIVE=0``,
:func:`kl_divergences` returns None and deployq.calib uses the NumPy code.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import numpy as np

from . import _cpu_flags, avx512_flags, built_library

SOURCE = Path(__file__).with_name("klsearch.cc")
_ENTRIES = ("dq_kl_divergences", "dq_kl_divergences_scalar")
_LOG_ENTRIES = ("dq_log_array", "dq_log_array_scalar")


def _flags() -> tuple[str, ...]:
    """AVX-512 (with DQ where present: one instruction less per logarithm) and FMA where this CPU has them."""
    cpu = set(_cpu_flags())
    flags = avx512_flags()
    if flags and "avx512dq" in cpu:
        flags += ("-mavx512dq",)
    return flags + (("-mfma",) if "fma" in cpu else ())


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded library, or None when turned off (``DEPLOYQ_NATIVE=0``) or when it cannot be built (a warning
    says why)."""
    if os.environ.get("DEPLOYQ_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(built_library(SOURCE, "libdeployq_klsearch", _flags(), lib_api=False)))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"deployq: native KL search unavailable ({e}); calibration uses NumPy (same thresholds, "
                      "slower)", RuntimeWarning, stacklevel=2)
        return None
    for name in _ENTRIES:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    for name in _LOG_ENTRIES:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
    return lib


def kl_divergences(hist: np.ndarray, levels: int = 128, eps: float = 1e-4,
                   scalar: bool = False) -> np.ndarray | None:
    """KL(P_t || Q_t) for t in [levels, len(hist)) as :func:`deployq.calib.kl.kl_divergences_numpy` computes it;
    None when the library is unavailable or the case is not the kernel's (levels not a power of two, no candidate).
    ``scalar``: the kernel's one-candidate-at-a-time path (tests). Raises ValueError on an empty histogram."""
    lib = load()
    levels = int(levels)
    h = np.ascontiguousarray(hist, dtype=np.float64)
    if lib is None or h.ndim != 1 or not 1 <= levels < len(h) < 2 ** 30:
        return None
    out = np.empty(len(h) - levels, dtype=np.float64)
    fn = lib.dq_kl_divergences_scalar if scalar else lib.dq_kl_divergences
    rc = fn(h.ctypes.data, len(h), levels, float(eps), out.ctypes.data)
    if rc == 1:
        raise ValueError("empty histogram")
    return out if rc == 0 else None


def log_array(x: np.ndarray, scalar: bool = False) -> np.ndarray | None:
    """The kernel's logarithm, elementwise (tests); None when the library is unavailable. ``scalar``: the
    one-at-a-time path (the SIMD path takes whole vectors, the rest one at a time)."""
    lib = load()
    if lib is None:
        return None
    a = np.ascontiguousarray(x, dtype=np.float64).ravel()
    out = np.empty_like(a)
    (lib.dq_log_array_scalar if scalar else lib.dq_log_array)(a.ctypes.data, len(a), out.ctypes.data)
    return out.reshape(np.shape(x))
