"""``deployq verify`` and ``deployq sensitivity``."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import EXIT_VERIFY as BREACH_EXIT  # deployq.errors: usage 2, bad input 3, breach 4


def register(subparsers) -> None:
    p = subparsers.add_parser("verify", help="run an export in its runtime and compare with the simulation",
                              description="Run EXPORT_DIR (a directory with deployq-export.json) in the real "
                                          f"runtime; exit {BREACH_EXIT} when a threshold is breached.")
    p.add_argument("export_dir")
    p.add_argument("--engine", choices=("onnxruntime", "ncnn", "mxnet", "tengine"), default=None,
                   help="runtime (default: the manifest's engine)")
    p.add_argument("--kernels", choices=("x86", "arm64"), default=None,
                   help="--engine tengine: the Tengine build to run (default: the export's, else x86); arm64 runs "
                        "Tengine's aarch64 build under qemu when TENGINE_ARM_RUNNER is set, else deployq's NumPy "
                        "model of its kernels")
    p.add_argument("--data", default=None,
                   help="images: a folder (class subfolders = labelled: accuracy too), an .npz of preprocessed "
                        "NxCxHxW 'x' (+ 'y'), or builtin (MNIST-5k test; the default for the built-in models). "
                        "Folder images get the preprocessing stated in the export's manifest")
    p.add_argument("--skip-bad-images", action="store_true", help="skip images that cannot be decoded")
    p.add_argument("--limit", type=int, default=1000, help="at most this many images (0: all)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="top-1 agreement with the simulation")
    p.add_argument("--max-error-steps", type=float, default=1.0, help="max |y - y_sim| in output steps")
    p.add_argument("--mean-error-steps", type=float, default=0.1, help="mean |y - y_sim| in output steps")
    p.add_argument("--min-cosine", type=float, default=0.99, help="per-layer cosine similarity")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer comparison")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_verify)
    from .sensitivity import register as register_sensitivity

    register_sensitivity(subparsers)


def run_verify(args: argparse.Namespace) -> int:
    from .verify import Thresholds, format_report, verify

    t = Thresholds(args.min_agreement, args.max_error_steps, args.mean_error_steps, args.min_cosine)
    data = args.data
    if data is None:
        from .manifest import read_manifest

        man = read_manifest(args.export_dir)
        if man.get("model") in ("mobilenet0.25", "resnet20") or not man.get("preprocess"):
            data = "builtin"
    rep = verify(args.export_dir, args.engine, data, args.limit or None, t, layers=not args.no_layers,
                 skip_bad=args.skip_bad_images, quiet=args.json, kernels=args.kernels)
    if args.json:
        json.dump(rep, sys.stdout, indent=2, default=float)
        print()
    else:
        print(format_report(rep))
    return 0 if rep["passed"] else BREACH_EXIT
