"""The ``deployq`` command line. Each subcommand lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that add subcommands (``register(subparsers)``), in the order they appear in ``deployq --help``.
SUBCOMMAND_MODULES = (
    "deployq.commands",
    "deployq.calib.cli",
    "deployq.qat_cli",
    "deployq.exporters.tengine.cli",
    "deployq.exporters.ncnn.cli",
    "deployq.exporters.onnx.cli",
    "deployq.verify_cli",
    "deployq.optimize_cli",
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
    """Run one subcommand. A problem ends with one line on stderr and the exit code of :mod:`deployq.errors`
    (Ctrl-C: 130); ``DEPLOYQ_DEBUG=1`` shows the traceback of an internal error."""
    import os

    from deployq.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, DeployqError

    cmd = "deployq"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        cmd = f"deployq {args.command}"
        import warnings

        with warnings.catch_warnings():  # MXNet's type-inference notice on partly traced nets: noise to a user
            warnings.filterwarnings("ignore", "Cannot decide type for the following arguments", UserWarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{cmd}: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DeployqError as e:
        print(f"{cmd}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        print(f"{cmd}: error: {f'{names}: {e.strerror}' if names and e.strerror else e}", file=sys.stderr)
        return EXIT_INTERNAL
    except ValueError as e:  # a value the user gave that a part of deployq refused
        print(f"{cmd}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyError, TypeError, RuntimeError) as e:
        print(f"{cmd}: error: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("DEPLOYQ_DEBUG") == "1":
            raise
        print(f"{cmd}: internal error: {type(e).__name__}: {e} (please report; DEPLOYQ_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
