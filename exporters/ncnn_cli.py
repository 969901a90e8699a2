"""``deployq export-ncnn``: Caffe pair + ncnn table, direct fp32/int8 ncnn models and the scale file."""

from __future__ import annotations

import argparse
from pathlib import Path

from .ncnn_export import balanced_images, export_files, export_qnet, minmax_calibrate


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-ncnn", help="export a quantized model for ncnn (Caffe + table, direct .param/.bin)",
        description="Write <name>.prototxt/.caffemodel + <name>.table (for caffe2ncnn + ncnn2int8), "
                    "<name>.param/.bin (fp32), <name>-int8.param/.bin (int8) and <name>.scales.json.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="built-in model: cached fp32 weights, min-max calibration on MNIST-5k train")
    src.add_argument("--qnet", help="a quantized net saved with deployq.save (<path>.params + .deployq.json)")
    src.add_argument("--symbol", help="MXNet symbol JSON (with --params and --scales)")
    p.add_argument("--params", help="MXNet .params for --symbol")
    p.add_argument("--scales", help="deployq scale file (JSON) for --symbol")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="file name stem (default: the model name)")
    p.add_argument("--calib-per-class", type=int, default=100, help="calibration images per class (--model)")
    p.add_argument("--winograd-3x3", choices=("disable", "six_bit"), default="disable",
                   help="int8 3x3 stride-1 convs: disable winograd (31=64) or train/quantize 6-bit weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import deployq

    if args.symbol:
        if not (args.params and args.scales):
            raise ValueError("--symbol needs --params and --scales")
        files = export_files(args.symbol, args.params, args.scales, args.out, args.name)
    elif args.qnet:
        qnet = deployq.load(args.qnet)
        files = export_qnet(qnet, args.out, args.name or Path(args.qnet).name.removesuffix(".params"))
    else:
        from deployq.zoo import get_trained

        net = get_trained(args.model, verbose=False)
        prof = deployq.load_profile("ncnn").with_options(winograd_3x3=args.winograd_3x3)
        deployq.quantize(net, profile=prof)
        minmax_calibrate(net, balanced_images(args.calib_per_class))
        files = export_qnet(net, args.out, args.name or args.model)
    for key, path in files.items():
        print(f"{key:<11} {path}")
    return 0
