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
from deployq.exporters.tengine.kernels import FAMILIES, kernel_family
from deployq.exporters.tengine.lower import TengineExportError, lower_model, refuse_mixed_precision
from deployq.exporters.tengine.writer import write

from deployq import preprocess
from deployq.errors import DeployqError, UsageError
from deployq.images import add_data_arguments
from deployq.modelargs import add_model_arguments
from deployq.profiles import Profile, load_profile

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
                   scales_where: str = "scale file", preprocess=None, profile: Profile | str = "tengine"
                   ) -> tuple[list[Path], list[str]]:
    """Annotate ``graph`` with ``scales`` (they win), calibrate the other tensors on ``calib``, lower and
    write. Returns the written paths and the warnings. ``profile``'s kernel family (``extra["kernels"]``) is
    recorded in the manifest; for ``arm64`` a layer Tengine's aarch64 build miscomputes or crashes on
    (:func:`~deployq.exporters.tengine.arm64.arm64_problems`) is refused before anything is written."""
    family = kernel_family(load_profile(profile))
    if scales is not None:
        layers = scales.get("layers") or {}
        refuse_mixed_precision(graph, [k for k, v in layers.items() if not v.get("quantized", True)])
        graph = annotate(graph, scales, where=scales_where, fingerprint=graph_fingerprint(graph))
    from deployq.exporters.ir.safenames import safe_names

    graph, renamed = safe_names(graph)  # names the .scale and symbol files can hold, the same in both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = lower_model(graph, calib, name=name or graph.name)
    if family == "arm64":
        from deployq.exporters.tengine.arm64 import arm64_problems

        original = {v: k for k, v in renamed.items()}
        bad = [(original.get(layer, layer), why) for layer, why in arm64_problems(exp.graph)]
        if bad:
            names = ", ".join(k for k, _ in bad[1:4]) + (", ..." if len(bad) > 4 else "")
            more = f" (and {len(bad) - 1} more: {names})" if len(bad) > 1 else ""
            raise TengineExportError(f"--kernels arm64: layer {bad[0][0]!r}: {bad[0][1]}{more}; nothing written")
    return write(exp, out_dir, name or graph.name, preprocess, renamed=renamed, kernels=family), exp.warnings


def graph_from_qnet(qnet, input_shape: tuple[int, ...] = (1, 3, 32, 32), name: str = "model") -> Graph:
    """The optimized fp32 graph of a deployq-quantized net with its trained int8 weight codes and input
    thresholds attached (``exporters.qattach``); :func:`tengine.prepare` uses both."""
    from deployq.exporters.ir.qattach import attach_qnet

    return attach_qnet(optimize(from_gluon(qnet, input_shape, name=name)), qnet)


def _load_graph(args: argparse.Namespace):
    """(IR graph, LoadedModel) of --model / --symbol / --qnet, at the input shape of the preprocessing."""

    from deployq.modelargs import load_model

    if args.model_pos:
        if args.model or args.symbol or args.qnet:
            raise UsageError(f"give the model once: {args.model_pos!r} and --model/--symbol/--qnet")
        args.model = args.model_pos
    m = load_model(args, preprocess.from_scale_file(args.scales), quiet=True, build_symbol=False)
    shape = m.preprocess.input_shape
    if m.kind == "qnet":
        return graph_from_qnet(m.net, shape, m.name), m
    if m.kind == "symbol":
        return from_files(args.symbol, args.params, shape), m
    return from_gluon(m.net, shape, name=m.name), m


def _calibration(args: argparse.Namespace, m, graph: Graph, scales: dict | None) -> list[np.ndarray] | None:
    """Min-max calibration batches for the tensors the scale file / saved net leaves without a range: --data
    (with the model's preprocessing), or MNIST-5k for the built-in models; None when none is needed."""
    if args.data == "builtin":  # MNIST-5k, class-balanced (its training set is sorted by class)
        if tuple(m.preprocess.input_shape[1:]) != (3, 32, 32):
            raise UsageError(f"--data builtin: MNIST-5k images are 3x32x32, the net takes {m.preprocess.input_shape}")
        return calibration_images(args.calib_samples or 256)
    if args.data:
        from deployq.images import open_data

        x = open_data(args.data, m.preprocess, limit=args.limit or args.calib_samples or None,
                      skip_bad=args.skip_bad_images).x
        return [x[i:i + CALIB_BATCH] for i in range(0, len(x), CALIB_BATCH)]
    if m.kind == "builtin" or (m.kind == "qnet" and m.name in ("mobilenet0.25", "resnet20")):
        return calibration_images(args.calib_samples) if args.calib_samples > 0 else None
    return None


def run_export_tengine(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (2/3 on bad input, nothing written)."""
    from deployq.exporters.tengine.lower import TengineExportError

    from deployq.atomic import check_target, safe_stem

    try:
        check_target(args.out)  # before any work: an --out that cannot hold an export, or a bad --name
        if args.name is not None:
            safe_stem(args.name)
        graph, m = _load_graph(args)
        scales = load_scale_file(args.scales) if args.scales else None
        calib = _calibration(args, m, graph, scales)
        try:
            prof = load_profile("tengine")
            prof = prof.with_options(extra={**prof.extra, "kernels": args.kernels})
            paths, notes = export_tengine(graph, args.out, args.name or m.name, calib, scales, str(args.scales),
                                          preprocess=m.preprocess, profile=prof)
        except TengineExportError as e:
            if calib is None and "has no threshold" in str(e):
                raise UsageError(f"{e}. Tengine's scale table needs every tensor's range, the "
                                 + ("scale file gives only the layer inputs" if scales else "model has none"),
                                 fix="pass --data DIR (your calibration images): deployq min-max calibrates the "
                                     "other tensors on them") from None
            raise
    except DeployqError as e:  # usage 2, bad input 3 (deployq.errors); anything else: deployq.cli.main
        print(f"deployq export-tengine: error: {e}", file=sys.stderr)
        return e.exit_code
    for msg in notes:
        print(f"warning: {msg}", file=sys.stderr)
    if args.json_out:
        import json

        print(json.dumps({"engine": "tengine", "model": args.name or graph.name,
                          "input_shape": list(graph.input_shape), "files": [str(p) for p in paths],
                          "warnings": list(notes)}, indent=2))
        return 0
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
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model NAME")
    add_model_arguments(p)
    p.add_argument("--scales", help="deployq scale file (deployq calibrate, or a Tengine export's "
                                    "<name>.scales.json); its thresholds win over calibration")
    p.add_argument("--out", default="exports", help="output directory (default: exports)")
    p.add_argument("--kernels", choices=FAMILIES, default="x86",
                   help="the Tengine build the export targets (default x86): arm64 records it for deployq verify "
                        "and refuses layers Tengine's aarch64 kernels miscompute or crash on (docs/arm.md)")
    p.add_argument("--name", help="base name of the files (default: the model name)")
    add_data_arguments(p, help_text="images to min-max calibrate the tensors the scale file leaves without a range "
                                    "(Tengine needs every tensor's): a folder or an .npz; default for the built-in "
                                    "models: MNIST-5k train")
    p.add_argument("--calib-samples", type=int, default=256,
                   help="at most this many calibration images (class-balanced MNIST-5k for the built-in models)")
    preprocess.add_arguments(p)
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print a JSON summary (written files, model, input shape) instead of the file list")
    p.set_defaults(func=run_export_tengine)
    return p
