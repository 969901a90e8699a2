"""Compile deployq's native libraries next to this file: at install (setup.py's ``build_ext`` calls :func:`build`)
or by hand with ``python -m deployq.native`` (``__main__.py``).

Standard library only, and MXNet is found without importing it: setup.py loads this file by path, in the build
environment (where ``mxnet`` is a build requirement, for its headers and ``lib_api.cc``), before deployq exists.
Each library is ``<stem>.so`` next to this file (:func:`target`) and carries its build key (:func:`key`: a hash of
its source, the headers next to it, MXNet's version and the compiler flags, which name the CPU features it was
built for) as ``dq_build_key()``; deployq.native loads a library only when that key is the current one, else it
uses its NumPy/MXNet fallback (same results, slower) with a one-line warning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the flags every library is compiled with: exact IEEE float32/float64 operations (no contraction, no fast-math)
BASE_FLAGS = ("-shared", "-fPIC", "-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math")
#: rawstats.cc reads MXNet's NDArray internals: the configuration of the pip wheel (oneDNN, no CUDA/BLAS headers)
_WHEEL_DEFINES = ("-DMXNET_USE_MKLDNN=1", "-DMSHADOW_USE_CBLAS=0", "-DMSHADOW_USE_MKL=0", "-DMSHADOW_USE_CUDA=0",
                  "-DMXNET_USE_CUDA=0", "-DDMLC_USE_CXX11=1")
#: how to rebuild the libraries by hand (named in every fallback message)
REBUILD = "python -m deployq.native"


@dataclass(frozen=True)
class Library:
    """One shared library: its C++ source (next to this file), whether it is an MXNet ``lib_api`` operator
    library (linked with the wheel's ``src/lib_api.cc``, loaded with ``mx.library.load``) or a ctypes one, and
    whether it has AVX-512 paths / reads MXNet's internals (oneDNN headers, OpenMP)."""

    stem: str
    source: str
    lib_api: bool
    avx512: bool = False
    internals: bool = False


LIBRARIES = (
    Library("libdeployq_fakequant", "fakequant.cc", lib_api=True),
    Library("libdeployq_calibops", "calibops.cc", lib_api=True, avx512=True),
    Library("libdeployq_rawstats", "rawstats.cc", lib_api=False, avx512=True, internals=True),
)


def library(stem: str) -> Library:
    """The library named ``stem``; KeyError if there is none."""
    for lib in LIBRARIES:
        if lib.stem == stem:
            return lib
    raise KeyError(f"no native library {stem!r} (known: {', '.join(lib.stem for lib in LIBRARIES)})")


def library_name(stem: str) -> str:
    """The file name of library ``stem``."""
    return stem + ".so"


def target(lib: Library) -> Path:
    """Where ``lib`` is installed and loaded from: next to this file."""
    return HERE / library_name(lib.stem)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty elsewhere)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return set()


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else g++ or c++ on PATH; None when there is none."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if Path(cxx).is_file() and os.access(cxx, os.X_OK) else None)
    return shutil.which("g++") or shutil.which("c++")


def mxnet_dir() -> Path:
    """The installed ``mxnet`` package's folder (its headers and ``src/lib_api.cc``), found without importing it."""
    spec = importlib.util.find_spec("mxnet")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mxnet is not installed (its headers are needed to build deployq's native code)")
    return Path(list(spec.submodule_search_locations)[0])


def flags(lib: Library) -> list[str]:
    """The compiler flags of ``lib`` on this machine, without include paths (they are part of :func:`key`)."""
    cpu = cpu_flags()
    out = [*BASE_FLAGS, *(["-mavx2"] if "avx2" in cpu else [])]
    if lib.avx512 and "avx512f" in cpu:
        out.append("-mavx512f")
    if lib.internals:
        out += [*_WHEEL_DEFINES, "-fopenmp"]
    return out


def key(lib: Library) -> str:
    """The build key of ``lib``: its source, the headers next to it, MXNet's version, :func:`flags`."""
    h = hashlib.sha256((HERE / lib.source).read_bytes())
    for header in sorted(HERE.glob("*.h")):
        h.update(header.read_bytes())
    try:
        mx_version = importlib.metadata.version("mxnet")
    except importlib.metadata.PackageNotFoundError:
        mx_version = "none"
    h.update(f"\0{mx_version}\0{' '.join(flags(lib))}".encode())
    return h.hexdigest()[:16]


def command(lib: Library, cxx: str, mxdir: Path, out: Path, stamp: Path) -> list[str]:
    """The compiler command line that builds ``lib`` (with the key stamp ``stamp``) into ``out``."""
    includes = [f"-I{mxdir / 'include'}", f"-I{mxdir / 'include' / 'mxnet'}"]
    if lib.internals:
        includes.append(f"-I{mxdir / 'include' / 'mkldnn'}")
    sources = [str(HERE / lib.source), str(stamp), *([str(mxdir / "src" / "lib_api.cc")] if lib.lib_api else [])]
    return [cxx, *flags(lib), *includes, *sources, "-o", str(out)]


def build(lib: Library, dest: Path | None = None, cxx: str | None = None) -> Path:
    """Compile ``lib`` into ``dest`` (default :func:`target`; written atomically) and return it. Raises
    RuntimeError with the compiler's last error lines when there is no compiler, no MXNet or the build fails."""
    cxx = cxx or compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/c++ on PATH, or $CXX)")
    dest = dest or target(lib)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        out, stamp = Path(tmp) / dest.name, Path(tmp) / "build_key.cc"
        stamp.write_text(f'extern "C" const char* dq_build_key() {{ return "{key(lib)}"; }}\n')
        cmd = command(lib, cxx, mxnet_dir(), out, stamp)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"{lib.source}: cannot run {cxx}: {e}") from None
        if res.returncode != 0:
            errors = [line for line in res.stderr.splitlines() if "error" in line] or res.stderr.splitlines()
            raise RuntimeError(f"{lib.source}: {cxx} failed: {' | '.join(errors[-3:])[:500]}")
        os.replace(out, dest)
    return dest
