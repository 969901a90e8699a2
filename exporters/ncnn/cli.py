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
    balanced_images,
    export_files,
    export_qnet,
    minmax_calibrate,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-ncnn", help="export a quantized model for ncnn (Caffe + table, direct .param/.bin)",
        description="Write <name>.prototxt/.caffemodel + <name>.table (for caffe2ncnn + ncnn2int8), "
                    "<name>.param/.bin (fp32), <name>-int8.param/.bin (int8), <name>.scales.json and "
                    "deployq-export.json (for deployq verify) with the saved quantized net (--model, --qnet) "
                    "or a copy of the MXNet json/params (--symbol).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="built-in model: cached fp32 weights; min-max calibration on MNIST-5k train, "
                                     "or the thresholds of --scales")
    src.add_argument("--qnet", help="a quantized net saved with deployq.save (<path>.params + .deployq.json)")
    src.add_argument("--symbol", help="MXNet symbol JSON (with --params and --scales)")
    p.add_argument("--params", help="MXNet .params for --symbol")
    p.add_argument("--scales", help="deployq scale file (JSON): required with --symbol; with --model its "
                                    "thresholds replace the min-max calibration (deployq calibrate writes one)")
    p.add_argument("--config", help="--model: a deployq config list (JSON), e.g. the config_list.json of "
                                    "deployq sensitivity --target-drop; excluded layers stay fp32 (no table lines)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="file name stem (default: the model name)")
    p.add_argument("--calib-per-class", type=int, default=100, help="calibration images per class (--model)")
    p.add_argument("--winograd-3x3", choices=("disable", "six_bit"), default="disable",
                   help="int8 3x3 stride-1 convs: disable winograd (31=64) or train/quantize 6-bit weights")
    p.set_defaults(func=run)


def _read_config(path: str) -> list:
    try:
        cfg = json.loads(Path(path).read_text())
    except OSError as e:
        raise FileNotFoundError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, list):
        raise ValueError(f"--config {path}: a deployq config list is a JSON list of dicts, got {type(cfg).__name__}")
    return cfg


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


def _quantized_builtin(args: argparse.Namespace):
    import deployq
    from deployq.zoo import get_trained

    config = _read_config(args.config) if args.config else None
    net = get_trained(args.model, verbose=False)
    prof = deployq.load_profile("ncnn").with_options(winograd_3x3=args.winograd_3x3)
    deployq.quantize(net, config, profile=prof)
    if not deployq.quant_layers(net):
        raise ValueError(f"--config {args.config}: it excludes every layer; nothing to quantize")
    if args.scales:
        _apply_scales(net, args.scales)
    else:
        minmax_calibrate(net, balanced_images(args.calib_per_class))
    return net


def run(args: argparse.Namespace) -> int:
    import deployq

    if args.config and not args.model:
        raise ValueError("--config applies to --model (a saved --qnet keeps the config it was quantized with; "
                         "for --symbol, leave the fp32 layers out of the scale file)")
    if args.params and not args.symbol:
        raise ValueError("--params applies to --symbol only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CaffeSkippedWarning)
        if args.symbol:
            if not (args.params and args.scales):
                raise ValueError("--symbol needs --params and --scales")
            files = export_files(args.symbol, args.params, args.scales, args.out, args.name)
        elif args.qnet:
            if args.scales:
                raise ValueError("--scales does not apply to --qnet: a saved quantized net carries its own "
                                 "calibrated ranges (to use a scale file, export with --model NAME --scales FILE)")
            qnet = deployq.load(args.qnet)
            base = args.qnet.removesuffix(".params").removesuffix(".deployq.json")
            model = json.loads(Path(f"{base}.deployq.json").read_text()).get("model") or None
            files = export_qnet(qnet, args.out, args.name or Path(base).name, model_name=model)
        else:
            net = _quantized_builtin(args)
            files = export_qnet(net, args.out, args.name or args.model, model_name=args.model)
    for w in caught:
        if issubclass(w.category, CaffeSkippedWarning):
            print(f"deployq export-ncnn: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for key, path in files.items():
        print(f"{key:<11} {path}")
    return 0
