"""The ``deployq simulate`` and ``deployq demo`` subcommands (heavy imports happen when they run)."""

from __future__ import annotations

import argparse
import json
import sys

from .zoo import BUILTIN_MODELS

_QUANT_TYPES = ("layer", "group", "channel")
_CALIB_MODES = ("naive", "minmax", "ema", "kl", "percentile", "mse")
_ALGORITHMS = ("naive", "qat", "dorefa", "lsq", "bnn", "observer")
_PROFILES = ("custom", "ncnn", "tengine", "onnx")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` and ``demo`` to the ``deployq`` command line."""
    p = sub.add_parser("simulate", help="simulated PTQ of a built-in model: fp32 vs int top-1 (the seed's study)",
                       description="Quantize a built-in fp32 model (trained on MNIST-5k, cached) with the given "
                                   "options, calibrate its input ranges, and print fp32 and simulated top-1 on the "
                                   "1000 MNIST-5k test images. --sweep prints a table over a grid of options.")
    p.add_argument("--model", default="resnet20", choices=sorted(BUILTIN_MODELS))
    p.add_argument("--weight-bits", type=int, default=8, help="weight bit width (default 8)")
    p.add_argument("--input-bits", type=int, default=8, help="layer-input bit width (default 8)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--input-signed", dest="input_signed", action="store_true", default=True,
                   help="signed symmetric inputs [-T, T] (default)")
    g.add_argument("--input-unsigned", dest="input_signed", action="store_false",
                   help="unsigned inputs [0, T] (the seed's default; negatives clip to 0)")
    p.add_argument("--quant-type", default="channel", choices=_QUANT_TYPES, help="weight granularity")
    p.add_argument("--input-offline", action="store_true",
                   help="use calibrated input ranges (default: online, each batch's own range; implied by "
                        "--calib-mode)")
    p.add_argument("--calib-mode", default=None, choices=_CALIB_MODES,
                   help="how offline input ranges are calibrated (default naive); giving it implies "
                        "--input-offline. naive: EMA passes (the seed); minmax: fp32 min/max; ema, kl, percentile, "
                        "mse: deployq.calib")
    p.add_argument("--calib-epochs", type=int, default=3, help="EMA passes for --calib-mode naive (default 3)")
    p.add_argument("--exclude-first-conv", action="store_true", help="keep the first convolution in fp32")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--merge-bn", "--fake-bn", dest="fake_bn", action="store_const", const=True, default=None,
                   help="fold BatchNorm into the weights before weight quantization (config fake_bn)")
    m.add_argument("--no-merge-bn", dest="fake_bn", action="store_const", const=False,
                   help="quantize the raw weights, BatchNorm stays separate (default: the profile's fold_bn)")
    p.add_argument("--num-sample", type=int, default=5, help="calibration images per class (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="custom", choices=_PROFILES,
                   help="integer grid (default custom: every option allowed; engine profiles reject what the "
                        "engine cannot run)")
    p.add_argument("--algorithm", default="qat", choices=_ALGORITHMS)
    p.add_argument("--show-config", action="store_true", help="print deployq.describe of the quantized net")
    p.add_argument("--sweep", action="store_true", help="print the results table over the default grid")
    p.add_argument("--json", dest="json_out", default=None, help="also write the result(s) to this JSON file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_simulate)

    d = sub.add_parser("demo", help="fp32 vs PTQ vs QAT int8 on MNIST-5k under the ncnn profile (< 5 min)",
                       description="Train (or load cached) fp32 mobilenet0.25 on MNIST-5k, calibrate (PTQ) and "
                                   "fine-tune (QAT) it under the ncnn profile, print the three accuracies.")
    d.add_argument("--model", default="mobilenet0.25", choices=sorted(BUILTIN_MODELS))
    d.add_argument("--qat-epochs", type=float, default=2.0, help="QAT epochs over MNIST-5k train (default 2)")
    d.add_argument("--lr", type=float, default=0.001, help="QAT SGD learning rate, cosine decay (default 0.001)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="deployq-demo", help="output directory (default ./deployq-demo)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_demo)


def _simulate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .simulate import SimOptions, format_table, simulate, sweep

    offline = args.input_offline
    if args.calib_mode is not None and not offline and not args.sweep:
        offline = True  # a calibration method only means something for offline (calibrated) input ranges
        print(f"deployq simulate: note: --calib-mode {args.calib_mode} implies --input-offline "
              "(calibrated input ranges)", file=sys.stderr)
    opts = SimOptions(model=args.model, weight_bits=args.weight_bits, input_bits=args.input_bits,
                      input_signed=args.input_signed, quant_type=args.quant_type, input_offline=offline,
                      calib_mode=args.calib_mode or "naive", calib_epochs=args.calib_epochs,
                      exclude_first_conv=args.exclude_first_conv, fake_bn=args.fake_bn, num_sample=args.num_sample,
                      batch_size=args.batch_size, seed=args.seed, profile=args.profile, algorithm=args.algorithm)
    opts.check()
    if args.sweep:
        base = opts if args.fake_bn is not None else SimOptions(**{**asdict(opts), "fake_bn": False})
        rows = sweep(args.model, base=base, quiet=args.quiet)
        print(format_table(rows))
        result: object = rows
    else:
        r = simulate(opts, quiet=args.quiet)
        if args.show_config:
            print(r.description)
        print(f"model {opts.model}  profile {opts.profile}  algorithm {opts.algorithm}")
        print(f"fp32 top-1:      {100 * r.fp32_top1:.2f}%")
        print(f"simulated top-1: {100 * r.quant_top1:.2f}%  "
              f"(W int{opts.weight_bits} {opts.quant_type}, IN {'int' if opts.input_signed else 'uint'}"
              f"{opts.input_bits} {'offline/' + opts.calib_mode if opts.input_offline else 'online'})")
        result = {"fp32_top1": r.fp32_top1, "quant_top1": r.quant_top1, "options": asdict(opts),
                  "config_list": r.config_list}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    sys.stdout.flush()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, qat_epochs=args.qat_epochs, lr=args.lr, seed=args.seed, out=args.out,
             quiet=args.quiet)
    return 0
