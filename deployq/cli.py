"""The ``deployq`` command line. Each subcommand lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that add subcommands (``register(subparsers)``), in the order they appear in ``deployq --help``.
SUBCOMMAND_MODULES = (
    "deployq.commands",
    "deployq.calib.cli",
    "deployq.exporters.tengine.cli",
    "deployq.exporters.ncnn.cli",
    "deployq.exporters.onnx.cli",
    "deployq.verify_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployq",
        description="Quantize MXNet Gluon CNNs on an edge engine's exact int8 grid (QAT or calibration) and "
                    "export them to ncnn, Tengine and ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"deployq {__import__('deployq').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue  # that part of deployq is not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as e:
        print(f"deployq {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
