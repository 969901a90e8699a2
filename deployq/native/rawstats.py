"""Calibration statistics read from the memory of MXNet's output NDArrays in their oneDNN layout
(``rawstats.cc``: ``dq_raw_stats``), without reordering them to NCHW first.

A plain C library (ctypes, not an MXNet operator) built at install against the headers of the MXNet wheel, like
the operator libraries of ``deployq.native``. It needs MXNet 1.9 built with oneDNN (the pinned pip wheel);
elsewhere, when it was not built, or with ``DEPLOYQ_NATIVE=0``, :func:`load` returns None and deployq.calib uses
the in-graph operator ``dq_calib_stats`` or NumPy (same numbers, slower).
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from . import enabled, installed_library

#: statistics modes of calibstats.h, as dq_calib_stats names them
MODES = {"range": 0, "clip": 1, "hist": 2, "pow2": 3}


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded library, or None where it does not apply (no oneDNN, another MXNet than 1.9) or cannot be built
    (a warning line names why)."""
    if not enabled():
        return None
    import mxnet as mx

    if not mx.__version__.startswith("1.9.") or not mx.runtime.Features().is_enabled("MKLDNN"):
        return None  # the mirrored MKLDNNMemory layout is MXNet 1.9's; nothing to read in place without oneDNN
    path = installed_library("libdeployq_rawstats", "calibration reorders activations (same results, slower)")
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.dq_raw_stats.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_void_p]
    lib.dq_raw_stats.restype = ctypes.c_int
    lib.dq_raw_totals.argtypes = lib.dq_raw_stats.argtypes
    lib.dq_raw_totals.restype = ctypes.c_int
    lib.dq_push_totals.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.dq_push_totals.restype = ctypes.c_int
    return lib


def _call_args(arrays: list, aux: np.ndarray | None):
    """(the library, the arrays' NDArray handles as a C array, the address of ``aux`` or None)."""
    lib = load()
    if lib is None:
        raise RuntimeError("deployq.native.rawstats is not available")
    handles = (ctypes.c_void_p * len(arrays))(*[a.handle.value for a in arrays])
    return lib, handles, None if aux is None else aux.ctypes.data


def raw_stats(arrays: list, mode: str, num_bins: int, aux: np.ndarray | None, out: np.ndarray) -> int:
    """``dq_calib_stats``'s output for ``arrays`` (MXNet NDArrays, already computed: the caller waits) written into
    ``out`` (float64); returns 0, or 1 + i when array i cannot be read in place (``out`` is then meaningless)."""
    lib, handles, aux_p = _call_args(arrays, aux)
    return int(lib.dq_raw_stats(handles, len(arrays), MODES[mode], int(num_bins), aux_p, out.ctypes.data))


def raw_totals(arrays: list, mode: str, num_bins: int, aux: np.ndarray | None, totals: np.ndarray) -> int:
    """One batch's :func:`raw_stats` added to running ``totals`` (float64, the same layout) in place: min / max
    (NaN kept), histogram counts summed; pow2 merges the counts so far when R grows (``deployq.calib.totals``).
    Modes range, hist (``aux``: absmax per tensor), pow2. Returns :func:`raw_stats`'s codes; on a non-zero code
    ``totals`` is unchanged."""
    lib, handles, aux_p = _call_args(arrays, aux)
    return int(lib.dq_raw_totals(handles, len(arrays), MODES[mode], int(num_bins), aux_p, totals.ctypes.data))


#: OpenMP threads of a pushed totals operation (the engine's team: OMP_NUM_THREADS, at most the cores)
PUSH_THREADS = max(1, min(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1), os.cpu_count() or 1))


def push_totals(arrays: list, mode: str, num_bins: int, aux: np.ndarray | None, totals: np.ndarray,
                rc: np.ndarray) -> None:
    """:func:`raw_totals` pushed to MXNet's engine: it runs once ``arrays`` are computed, on the engine's CPU
    worker and its OpenMP threads. ``aux``, ``totals`` and ``rc`` (int32, one element: the code) must not be
    touched or freed before ``mx.nd.waitall()``. Raises if the engine refuses the operation."""
    import mxnet as mx

    lib, handles, aux_p = _call_args(arrays, aux)
    push = ctypes.cast(mx.base._LIB.MXEnginePushSyncND, ctypes.c_void_p)
    if lib.dq_push_totals(push, handles, len(arrays), MODES[mode], int(num_bins), aux_p, totals.ctypes.data,
                          PUSH_THREADS, rc.ctypes.data) != 0:
        mx.base.check_call(-1)
