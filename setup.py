"""Build step of deployq's native libraries (the metadata is in pyproject.toml).

``pip install [-e] .`` compiles deployq/native/*.cc with the system C++ compiler (deployq/native/build.py) into
deployq/native/ (an editable install: in the source tree). Without a compiler, or when a build fails, one line
says so and the install goes on: deployq then uses its NumPy/MXNet fallback (same results, slower).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_BUILD_PY = Path(__file__).parent / "deployq" / "native" / "build.py"
_spec = importlib.util.spec_from_file_location("_deployq_native_build", _BUILD_PY)
native_build = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = native_build  # (dataclasses look the module up)
_spec.loader.exec_module(native_build)


class BuildNative(build_ext):
    """Compiles each library with native_build.build (not a Python extension: no Python headers, its own flags);
    a library that cannot be built is skipped with a one-line message."""

    def run(self) -> None:
        if native_build.compiler() is None:
            self._say("no C++ compiler (g++/c++ on PATH, or $CXX): native libraries not built; deployq uses its "
                      "NumPy/MXNet fallback (same results, slower QAT and calibration); build them later with: "
                      f"{native_build.REBUILD}")
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        lib = native_build.library(ext.name.rsplit(".", 1)[-1])
        try:
            native_build.build(lib, Path(self.get_ext_fullpath(ext.name)))
        except RuntimeError as e:
            self._say(f"{e}; {lib.stem} not built, deployq uses its fallback (same results, slower); "
                      f"build it later with: {native_build.REBUILD}")

    def get_ext_filename(self, fullname: str) -> str:
        *package, stem = fullname.split(".")
        return str(Path(*package, native_build.library_name(stem)))

    @staticmethod
    def _say(msg: str) -> None:
        print(f"deployq: warning: {msg}", file=sys.stderr, flush=True)


setup(
    ext_modules=[Extension(f"deployq.native.{lib.stem}", [f"deployq/native/{lib.source}"], optional=True)
                 for lib in native_build.LIBRARIES],
    cmdclass={"build_ext": BuildNative},
)
