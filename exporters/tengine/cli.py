"""``deployq export-tengine``: a Gluon model or MXNet json/params (+ scale file) -> Tengine-ready files."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from deployq.exporters.ir.annotate import annotate, graph_fingerprint, load_scale_file
from deployq.exporters.ir.frontend import from_files, from_gluon
from deployq.exporters.ir.graph import Graph
from deployq.exporters.ir.passes import optimize
from deployq.exporters.tengine.lower import lower_model, refuse_mixed_precision
from deployq.exporters.tengine.writer import write

import deployq

CALIB_BATCH = 128


def calibration_images(n: int) -> list[np.ndarray]:
    """``n`` class-balanced MNIST-5k training images in batches (the built-in models' calibration set; the
    training set is sorted by class, so its first images would all be zeros)."""
    from deployq.data import class_balanced_subset, load_mnist5k

    train = load_mnist5k("train")
    classes = len(np.unique(train.y))
    x = train.x[class_balanced_subset(train.y, -(-n // classes))[:n]] if n < len(train.y) else train.x
    return [x[i:i + CALIB_BATCH] for i in range(0, len(x), CALIB_BATCH)]


def export_tengine(graph: Graph, out_dir: str | Path, name: str | None = None,
                   calib: list[np.ndarray] | None = None, scales: dict | None = None,
                   scales_where: str = "scale file") -> tuple[list[Path], list[str]]:
    """Annotate ``graph`` with ``scales`` (they win), calibrate the other tensors on ``calib``, lower and
    write. Returns the written paths and the warnings."""
    if scales is not None:
        layers = scales.get("layers") or {}
        refuse_mixed_precision(graph, [k for k, v in layers.items() if not v.get("quantized", True)])
        graph = annotate(graph, scales, where=scales_where, fingerprint=graph_fingerprint(graph))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = lower_model(graph, calib, name=name or graph.name)
    return write(exp, out_dir, name or graph.name), exp.warnings


def graph_from_qnet(qnet, input_shape: tuple[int, ...] = (1, 3, 32, 32), name: str = "model") -> Graph:
    """The optimized fp32 graph of a deployq-quantized net with its trained int8 weight codes and input
    thresholds attached (``exporters.qattach``); :func:`tengine.prepare` uses both."""
    from deployq.exporters.ir.qattach import attach_qnet

    return attach_qnet(optimize(from_gluon(qnet, input_shape, name=name)), qnet)


def _load_graph(args: argparse.Namespace) -> Graph:
    shape = tuple(int(v) for v in args.input_shape.split(","))
    sources = [bool(args.model), bool(args.symbol or args.params), bool(args.qnet)]
    if sum(sources) != 1:
        raise ValueError("give exactly one of: a model name, --symbol/--params, --qnet")
    if args.qnet:
        return graph_from_qnet(deployq.load(args.qnet), shape, Path(args.qnet).name.split(".")[0])
    if args.symbol or args.params:
        if not (args.symbol and args.params):
            raise ValueError("--symbol and --params go together")
        return from_files(args.symbol, args.params, shape)
    if not args.model:
        raise ValueError("give a model name (built-in: mobilenet0.25, resnet20) or --symbol/--params")
    from deployq.zoo import BUILTIN_MODELS, get_model, get_trained

    if args.model in BUILTIN_MODELS:
        net = get_trained(args.model, verbose=False)
    else:
        import mxnet as mx

        net = get_model(args.model)
        net.initialize(mx.init.Xavier())
        print(f"warning: {args.model} is not a built-in model; exporting random weights", file=sys.stderr)
    return from_gluon(net, shape, name=args.model)


def run_export_tengine(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (2 on bad input, nothing written)."""
    try:
        graph = _load_graph(args)
        scales = load_scale_file(args.scales) if args.scales else None
        calib = calibration_images(args.calib_samples) if args.calib_samples > 0 else None
        paths, notes = export_tengine(graph, args.out, args.name, calib, scales, str(args.scales))
    except (ValueError, OSError) as e:
        print(f"deployq export-tengine: error: {e}", file=sys.stderr)
        return 2
    for msg in notes:
        print(f"warning: {msg}", file=sys.stderr)
    for p in paths:
        print(f"wrote {p}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export-tengine`` to a ``deployq`` argparse CLI (``args.func(args)`` runs it)."""
    p = subparsers.add_parser(
        "export-tengine", help="export MXNet json/params + Tengine int8 scale table",
        description="Fold BN, place weights on Tengine's per-channel int8 grid, calibrate every tensor "
                    "(min-max) unless a scale file gives it, and write <name>-symbol.json, "
                    "<name>-0000.params (for Tengine's convert_tool), <name>.scale (quant_tool_int8 -f) "
                    "and <name>.scales.json.")
    p.add_argument("model", nargs="?", help="built-in model (mobilenet0.25, resnet20) or gluoncv model name")
    p.add_argument("--symbol", help="MXNet x-symbol.json (with --params)")
    p.add_argument("--params", help="MXNet x-0000.params (legacy format)")
    p.add_argument("--qnet", help="a quantized net saved with deployq.save (<name>.params + .deployq.json)")
    p.add_argument("--scales", help="deployq scale file (JSON); its thresholds win over calibration")
    p.add_argument("--out", default="exports", help="output directory (default: exports)")
    p.add_argument("--name", help="base name of the files (default: the model name)")
    p.add_argument("--calib-samples", type=int, default=256, help="class-balanced MNIST-5k train images to calibrate")
    p.add_argument("--input-shape", default="1,3,32,32", help="N,C,H,W (default 1,3,32,32)")
    p.set_defaults(func=run_export_tengine)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m deployq.exporters.tengine.cli export-tengine ...``)."""
    parser = argparse.ArgumentParser(prog="deployq")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
