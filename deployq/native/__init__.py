"""Fused fake-quantization operators (``fakequant.cc``) compiled once against MXNet's ``lib_api`` and loaded
with ``mx.library.load``.

They compute what ``deployq.fakequant`` and ``deployq.blocks`` compute with MXNet operators, bit for bit in the
forward, in one pass per tensor instead of ~30 small operators per layer (QAT on CPU is dominated by operator
overhead otherwise). The library is built with the system C++ compiler into ``$DEPLOYQ_CACHE/native`` (default
``~/.cache/deployq/native``) the first time it is needed, keyed by a hash of the source and of MXNet's version.
Where no compiler is found or the build fails, deployq warns once and uses the MXNet-operator formulation:
same results, slower training. ``DEPLOYQ_NATIVE=0`` turns the native operators off.
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

SOURCE = Path(__file__).with_name("fakequant.cc")
OPS = ("dq_act_quant", "dq_weight_quant", "dq_bn_stats", "dq_bn_fold")


def _cache_dir() -> Path:
    root = os.environ.get("DEPLOYQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deployq")
    return Path(root) / "native"


def _cpu_flags() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return []


def _arch_flags() -> list[str]:
    """-mavx2 where this x86-64 CPU has it (the library is built per machine, its cache key names the flags)."""
    return ["-mavx2"] if "avx2" in _cpu_flags() else []


def avx512_flags() -> tuple[str, ...]:
    """-mavx512f where this CPU has it: for the calibration kernels (calibstats.h), which have an AVX-512 path."""
    return ("-mavx512f",) if "avx512f" in _cpu_flags() else ()


def _build(source: Path, target: Path, lib_api: bool = True, flags: tuple[str, ...] = ()) -> None:
    """Compile ``source`` (with MXNet's ``lib_api.cc`` when ``lib_api``) into the shared library ``target``
    (atomically); ``flags``: extra compiler flags."""
    import mxnet as mx

    mxdir = Path(mx.__file__).parent
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/c++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cxx, "-shared", "-fPIC", "-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math",
               "-fno-trapping-math", *_arch_flags(), *flags, f"-I{mxdir / 'include'}",
               f"-I{mxdir / 'include' / 'mxnet'}", str(source),
               *([str(mxdir / "src" / "lib_api.cc")] if lib_api else []), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent build never sees a half-written library


def library_key(source: Path, flags: tuple[str, ...] = ()) -> str:
    """Cache key of a library built from ``source``: the source, the headers next to it (``*.h``), MXNet's
    version, the compiler flags that vary per machine or per library."""
    import mxnet as mx

    h = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        h.update(header.read_bytes())
    h.update((mx.__version__ + " ".join(_arch_flags() + list(flags))).encode())
    return h.hexdigest()[:16]


def built_library(source: Path, stem: str, flags: tuple[str, ...] = (), lib_api: bool = True) -> Path:
    """The shared library of ``source`` in the cache (``<stem>-<library_key>.so``), compiled first if missing;
    raises RuntimeError when the build fails."""
    lib = _cache_dir() / f"{stem}-{library_key(source, flags)}.so"
    if not lib.exists():
        _build(source, lib, lib_api=lib_api, flags=flags)
    return lib


def load_library(source: Path, stem: str, ops: tuple[str, ...], without: str, flags: tuple[str, ...] = ()) -> bool:
    """Build (first use) and load the operator library of ``source`` (cache key: source, MXNet version, arch
    flags); True when ``ops`` are registered. ``without``: what deployq does instead, for the warning; ``flags``:
    extra compiler flags."""
    if os.environ.get("DEPLOYQ_NATIVE", "1") == "0":
        return False
    import mxnet as mx

    if all(hasattr(mx.nd, op) and hasattr(mx.sym, op) for op in ops):
        return True
    try:
        mx.library.load(str(built_library(source, stem, flags)), False)
    except (RuntimeError, OSError, mx.base.MXNetError) as e:
        warnings.warn(f"deployq: fused operators of {source.name} unavailable ({e}); {without}", RuntimeWarning,
                      stacklevel=3)
        return False
    return all(hasattr(mx.nd, op) and hasattr(mx.sym, op) for op in ops)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the fused operators are loaded (built on first use); False (with one warning) otherwise."""
    return load_library(SOURCE, "libdeployq_fakequant", OPS, "using MXNet operators (same results, slower QAT)")
