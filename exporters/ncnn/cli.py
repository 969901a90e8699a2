"""``deployq export-ncnn``: Caffe pair + ncnn table, direct fp32/int8 ncnn models and the scale file, plus the
manifest (and saved net or fp32 MXNet files) that ``deployq verify`` reads."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from deployq.exporters.ncnn.export import (
    CaffeSkippedWarning,
    Int8SkippedWarning,
    balanced_images,
    export_files,
    export_qnet,
    minmax_calibrate,
)

from deployq import preprocess
from deployq.checks import Fp32LayersWarning
from deployq.config import load_config_list
from deployq.errors import UsageError
from deployq.modelargs import add_model_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-ncnn", help="export a quantized model for ncnn (Caffe + table, direct .param/.bin)",
        description="Write <name>.prototxt/.caffemodel + <name>.table (for caffe2ncnn + ncnn2int8), "
                    "<name>.param/.bin (fp32), <name>-int8.param/.bin (int8), <name>.scales.json and "
                    "deployq-export.json (for deployq verify) with the saved quantized net (--model, --qnet) "
                    "or a copy of the MXNet json/params (--symbol).")
    add_model_arguments(p)
    p.add_argument("--scales", help="deployq scale file (deployq calibrate): required for --symbol and a gluoncv "
                                    "--model; for a built-in --model its thresholds replace the min-max calibration "
                                    "on MNIST-5k")
    p.add_argument("--config", help="--model/--symbol: a deployq config list (JSON), e.g. the config_list.json of "
                                    "deployq sensitivity --target-drop; excluded layers stay fp32 (no table lines)")
    preprocess.add_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="file name stem (default: the model name)")
    p.add_argument("--calib-per-class", type=int, default=100,
                   help="built-in --model without --scales: MNIST-5k calibration images per class")
    p.add_argument("--winograd-3x3", choices=("disable", "six_bit"), default="disable",
                   help="int8 3x3 stride-1 convs: disable winograd (31=64) or train/quantize 6-bit weights")
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print a JSON summary (written files, model, input shape) instead of the file list")
    p.set_defaults(func=run)


def _apply_scales(net, path: str) -> None:
    """Set the scale file's calibrated input ranges into the quantized net (``deployq.calib.apply``)."""
    import deployq
    from deployq import calib

    sf = calib.load(path)
    grid = deployq.load_profile(sf.profile).activation if sf.profile else None
    if grid is not None and not (grid.symmetric and grid.signed):
        raise ValueError(f"--scales {path}: calibrated for profile {sf.profile!r} (asymmetric/unsigned "
                         "activations); ncnn computes symmetric signed int8: calibrate with --profile ncnn")
    calib.apply(net, sf)


def _quantized(args: argparse.Namespace, m):
    """The fp32 model of --model/--symbol quantized on ncnn's grid, with the scale file's ranges (built-in models:
    min-max on MNIST-5k without one)."""
    import deployq

    config = load_config_list(args.config) if args.config else None
    prof = deployq.load_profile("ncnn").with_options(winograd_3x3=args.winograd_3x3)
    deployq.quantize(m.net, config, profile=prof)
    if not deployq.quant_layers(m.net):
        raise UsageError(f"--config {args.config}: it excludes every layer; nothing to quantize")
    if args.scales:
        _apply_scales(m.net, args.scales)
    elif m.kind == "builtin":
        minmax_calibrate(m.net, balanced_images(args.calib_per_class))
    else:
        raise UsageError(f"no --scales: {m.name} needs ranges calibrated on your images",
                         fix="run deployq calibrate with this model and --data DIR, then pass --scales FILE")
    return m.net


def run(args: argparse.Namespace) -> int:
    from deployq.atomic import check_target, safe_stem
    from deployq.modelargs import load_model

    check_target(args.out)  # before any work: an --out that cannot hold an export, or a bad --name, is refused
    if args.name is not None:
        safe_stem(args.name)
    if args.qnet and args.scales:
        raise UsageError("--scales does not apply to --qnet: a saved quantized net carries its own calibrated ranges "
                         "(to use a scale file, export the fp32 model with --scales FILE)")
    if args.qnet and args.config:
        raise UsageError("--config does not apply to --qnet: a saved quantized net keeps the config it was "
                         "quantized with")
    files_route = bool(args.symbol) and not args.config and args.winograd_3x3 == "disable"
    m = load_model(args, preprocess.from_scale_file(args.scales), quiet=True, build_symbol=not files_route)
    name = args.name or (Path(args.qnet).name.removesuffix(".params").removesuffix(".deployq.json") if args.qnet
                         else m.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CaffeSkippedWarning)
        warnings.simplefilter("always", Fp32LayersWarning)
        warnings.simplefilter("always", Int8SkippedWarning)
        if files_route:
            if not args.scales:
                raise UsageError("--symbol needs --scales (deployq calibrate --symbol ... --data DIR writes one)")
            files = export_files(args.symbol, args.params, args.scales, args.out, name, preprocess=m.preprocess)
        elif m.quantized:
            files = export_qnet(m.net, args.out, name, model_name=m.name, preprocess=m.preprocess)
        else:
            files = export_qnet(_quantized(args, m), args.out, name, model_name=m.name, preprocess=m.preprocess)
    for w in caught:
        if issubclass(w.category, (CaffeSkippedWarning, Fp32LayersWarning, Int8SkippedWarning)):
            print(f"deployq export-ncnn: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.json_out:
        print(json.dumps({"engine": "ncnn", "model": m.name, "input_shape": list(m.preprocess.input_shape),
                          "files": {k: str(v) for k, v in files.items()}}, indent=2))
        return 0
    for key, path in files.items():
        print(f"{key:<11} {path}")
    return 0
