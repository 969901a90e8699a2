"""``python -m deployq.native [--check]``: build deployq's native libraries next to the package (what the install
does), or with ``--check`` say in one line which ones cannot be used. Exit status 1 if any cannot."""

from __future__ import annotations

import argparse
import sys

from . import build, library_problem


def check() -> int:
    """One warning line on stderr when a library is missing or out of date (grouped by reason); 1 if any is."""
    by_reason: dict[str, list[str]] = {}
    for lib in build.LIBRARIES:
        problem = library_problem(lib)
        if problem is not None:
            by_reason.setdefault(problem, []).append(lib.stem.removeprefix("libdeployq_"))
    if not by_reason:
        return 0
    if "not built" in by_reason and build.compiler() is None:
        by_reason["not built (no C++ compiler: g++/c++ on PATH, or $CXX)"] = by_reason.pop("not built")
    what = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
    print(f"deployq: warning: native libraries not usable ({what}); deployq uses its NumPy/MXNet fallback (same "
          f"results, slower QAT and calibration); build them with: {build.REBUILD}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=build.REBUILD,
                                 description="Build deployq's native libraries next to the package.")
    ap.add_argument("--check", action="store_true", help="only report libraries that cannot be used")
    if ap.parse_args(argv).check:
        return check()
    failed = 0
    for lib in build.LIBRARIES:
        try:
            print(f"deployq: built {build.build(lib)}")
        except RuntimeError as e:
            failed += 1
            print(f"deployq: {lib.stem} not built: {e}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
