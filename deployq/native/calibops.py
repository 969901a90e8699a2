"""The fused calibration operator (``calibops.cc``: ``dq_calib_stats``), built and loaded like the fake-quant
operators (``deployq.native``) but as a library of its own, keyed by a hash of its source.

deployq.calib uses it to reduce every tapped activation inside the graph (min/max, EMA clipped counts, histograms
of |x|) instead of reading the tensors on the host; without a compiler (or with ``DEPLOYQ_NATIVE=0``) calibration
reads the tensors and computes the same numbers in NumPy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from . import _arch_flags, _cache_dir

SOURCE = Path(__file__).with_name("calibops.cc")
OP = "dq_calib_stats"


def _build(target: Path) -> None:
    import mxnet as mx

    mxdir = Path(mx.__file__).parent
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/c++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cxx, "-shared", "-fPIC", "-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math",
               "-fno-trapping-math", *_arch_flags(), f"-I{mxdir / 'include'}", f"-I{mxdir / 'include' / 'mxnet'}",
               str(SOURCE), str(mxdir / "src" / "lib_api.cc"), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent build never sees a half-written library


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when ``dq_calib_stats`` is loaded (built on first use); False (with one warning) otherwise."""
    if os.environ.get("DEPLOYQ_NATIVE", "1") == "0":
        return False
    import mxnet as mx

    if hasattr(mx.sym, OP):
        return True
    key = hashlib.sha256(SOURCE.read_bytes() + mx.__version__.encode() + " ".join(_arch_flags()).encode()
                         ).hexdigest()[:16]
    lib = _cache_dir() / f"libdeployq_calibops-{key}.so"
    try:
        if not lib.exists():
            _build(lib)
        mx.library.load(str(lib), False)
    except (RuntimeError, OSError, mx.base.MXNetError) as e:
        warnings.warn(f"deployq: fused calibration operator unavailable ({e}); reading activations on the host "
                      "(same results, slower calibration)", RuntimeWarning, stacklevel=2)
        return False
    return hasattr(mx.sym, OP) and hasattr(mx.nd, OP)
