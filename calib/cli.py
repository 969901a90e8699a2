"""``deployq calibrate``: calibrate the layer-input ranges of a built-in model or a saved quantized net on MNIST-5k,
an ``.npz`` or an image folder, and write the scale file (``deployq.scales`` v1) atomically.

The lead's ``deployq/cli.py`` calls ``register(subparsers)``; ``python -m deployq.calib.cli`` also works.
Exit status: 0 written, 2 bad input (message on stderr, no file written).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from .. import preprocess
from ..errors import DeployqError, UsageError
from ..images import add_data_arguments, open_data
from ..modelargs import add_model_arguments, load_model
from .api import CalibrationWarning
from .base import CALIBRATORS, DEFAULT_METHOD

#: method -> the method options it takes (CLI dest names)
METHOD_OPTIONS = {"minmax": (), "ema": ("momentum", "passes"), "kl": ("bins", "clip_guard", "one_pass"),
                  "percentile": ("percentile", "bins"), "mse": ("bins",), "aciq": (), "eq": ("bins", "clip_guard")}
_FLAGS = {"momentum": "--momentum", "passes": "--passes", "bins": "--bins",
          "clip_guard": "--clip-guard/--no-clip-guard", "percentile": "--percentile", "one_pass": "--one-pass"}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate", help="post-training calibration of activation ranges -> scale file",
        description="Calibrate the input range of every quantized Conv/Dense and write a deployq scale file "
                    "(schema deployq.scales v1) that every exporter reads. The net is a built-in fp32 model "
                    "(every Conv/Dense on the profile's grid) or a quantized net saved with deployq.save "
                    "(--qnet; each layer on its own input grid). Guard-rail warnings go to stderr, one line "
                    "each. Exit 0 when written; 2 on bad input (nothing written).")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model NAME")
    add_model_arguments(p)
    add_data_arguments(p, help_text="calibration images: a folder (images inside, or class subfolders), an .npz of "
                                    "preprocessed NxCxHxW 'x' (+ 'y'), or builtin (MNIST-5k train; the built-in "
                                    "models' default). Required for any other model")
    preprocess.add_arguments(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(CALIBRATORS),
                   help=f"calibration method (default {DEFAULT_METHOD}: per tensor the threshold of least squared "
                        "error; kl: ncnn2table's KL with deployq's clip guard; aciq, eq: ncnn2table's others)")
    p.add_argument("--profile", default=None,
                   help="engine profile (default: the quantized net's, else ncnn)")
    p.add_argument("--num-sample", type=int, default=None,
                   help="calibration images per class, where labels are known (default 10 for builtin; all "
                        "images of a file)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the class-balanced subset")
    g = p.add_argument_group("method options (each only for its method)")
    g.add_argument("--momentum", type=float, default=None, help="ema: moving-average momentum in [0, 1) (0.9)")
    g.add_argument("--passes", type=int, default=None, help="ema: passes over the data (1)")
    g.add_argument("--bins", type=int, default=None,
                   help="kl: histogram bins over [0, max] (2048); percentile, mse: a power of two, bins over [0, R), "
                        "R the power of two above max (4096)")
    g.add_argument("--percentile", type=float, default=None, help="percentile: percentile of |x| in (0, 100] (99.99)")
    cg = g.add_mutually_exclusive_group()
    cg.add_argument("--clip-guard", type=float, default=None, metavar="SHARE",
                    help="kl: raise a KL threshold that clips more than SHARE of the values (on, 0.001)")
    cg.add_argument("--no-clip-guard", dest="clip_guard", action="store_const", const=-1.0,
                    help="kl: keep ncnn2table's threshold unchanged")
    g.add_argument("--one-pass", action="store_const", const=True, default=None,
                   help="kl: read the data once, KL over the power-of-two histogram of percentile/mse (faster; not "
                        "ncnn2table's exact histogram)")
    w = p.add_argument_group("guard rails")
    w.add_argument("--warn-clip-share", type=float, default=None,
                   help="warn when a threshold clips more than this share of a tensor's values (0.001)")
    w.add_argument("--warn-threshold-ratio", type=float, default=None,
                   help="warn when a signed tensor's threshold is below this fraction of its observed max |x| "
                        "(0.5)")
    p.add_argument("--plain-graph", action="store_true",
                   help="read the activations from the plain fp32 graph instead of oneDNN's fused one (Conv+BN+ReLU "
                        "as one op, BN folded: faster; the same tensors up to float rounding)")
    p.add_argument("--out", default="scales.json", help="scale file to write (default scales.json)")
    p.add_argument("--report", action="store_true", help="print the per-layer table (threshold, max, clipped)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary (warnings still print)")
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print a JSON summary (file, tensors with thresholds, images, warnings) on stdout")
    p.set_defaults(func=run)
    return p


def method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The calibrator keywords of the command line; UsageError for an option of another method or a bad value."""
    allowed = METHOD_OPTIONS[args.method]
    given = [k for k in _FLAGS if getattr(args, k, None) is not None]
    wrong = [k for k in given if k not in allowed]
    if wrong:
        takes = ", ".join(_FLAGS[k] for k in allowed) or "no method options"
        raise UsageError(f"{', '.join(_FLAGS[k] for k in wrong)} does not apply to --method {args.method} "
                         f"(it takes {takes})")
    kw: dict[str, Any] = {}
    if args.momentum is not None:
        if not 0.0 <= args.momentum < 1.0:
            raise UsageError(f"--momentum must be in [0, 1), got {args.momentum:g}")
        kw["momentum"] = args.momentum
    if args.passes is not None:
        if args.passes < 1:
            raise UsageError(f"--passes must be >= 1, got {args.passes}")
        kw["passes"] = args.passes
    if args.bins is not None:
        if args.bins < 16:
            raise UsageError(f"--bins must be >= 16, got {args.bins}")
        if (args.method in ("percentile", "mse") or getattr(args, "one_pass", None)) and args.bins & (args.bins - 1):
            raise UsageError(f"--bins must be a power of two for --method {args.method} (its histogram range "
                             f"doubles in one pass), got {args.bins}")
        kw["num_bins"] = args.bins
    if args.percentile is not None:
        if not 0.0 < args.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (0, 100], got {args.percentile:g}")
        kw["percentile"] = args.percentile
    if getattr(args, "one_pass", None):
        kw["one_pass"] = True
    if args.clip_guard is not None:
        if args.clip_guard == -1.0:
            kw["max_clipped_share"] = None
        elif not 0.0 < args.clip_guard < 1.0:
            raise UsageError(f"--clip-guard must be a share in (0, 1), got {args.clip_guard:g}")
        else:
            kw["max_clipped_share"] = args.clip_guard
    for name in ("warn_clip_share", "warn_threshold_ratio"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {v:g}")
    for name in ("batch_size", "num_sample", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    return kw


def load_net(args: argparse.Namespace):
    """The LoadedModel of --model / --symbol / --qnet (or the positional built-in name)."""
    if args.model_pos:
        if args.model or args.symbol or args.qnet:
            raise UsageError(f"give the model once: {args.model_pos!r} and --model/--symbol/--qnet")
        args.model = args.model_pos
    m = load_model(args, quiet=args.quiet)
    if args.profile is not None and m.quantized and args.profile != m.profile:
        raise UsageError(f"--profile {args.profile}: the quantized net {args.qnet} was made for profile {m.profile}")
    return m


def load_images(args: argparse.Namespace, m) -> tuple:
    """Calibration images (float32 NCHW) of --data for the model's preprocessing, and the data's name."""
    from .api import class_balanced_sampler

    spec = args.data
    if spec is None:
        if m.kind == "builtin" or (m.kind == "qnet" and m.name in ("mobilenet0.25", "resnet20")):
            spec = "builtin"
        else:
            raise UsageError(f"no --data: {m.name} must be calibrated on your images",
                             fix="pass --data DIR (a folder of images, or class subfolders) or --data FILE.npz")
    data = open_data(spec, m.preprocess, split="train", limit=None if args.num_sample else args.limit,
                     skip_bad=args.skip_bad_images, quiet=args.quiet)
    x, y = data.x, data.y
    per_class = args.num_sample or (10 if spec == "builtin" else None)
    if per_class is not None:
        if y is None:
            raise UsageError(f"--num-sample: {spec} has no labels (class subfolders or 'y'); use --limit instead")
        x = x[class_balanced_sampler(y, per_class, args.seed)]
        if args.limit:
            x = x[:args.limit]
    if len(x) == 0:
        raise UsageError(f"--data {spec}: no images")
    return x, spec


def run(args: argparse.Namespace) -> int:
    from .api import WARN_CLIP_SHARE, WARN_THRESHOLD_RATIO, calibrate, report

    try:
        kw = method_kwargs(args)
        m = load_net(args)
        net, name, profile = m.net, m.name, args.profile or m.profile or "ncnn"
        x, spec = load_images(args, m)
        with warnings.catch_warnings():
            # the guard-rail lines are printed below, not as Python warnings (others, e.g. a fallback, still show)
            warnings.simplefilter("ignore", CalibrationWarning)
            sf = calibrate(net, x, method=args.method, profile=profile, quiet=args.quiet,
                           batch_size=args.batch_size, model_name=name, fuse=not args.plain_graph,
                           warn_clip_share=WARN_CLIP_SHARE if args.warn_clip_share is None else args.warn_clip_share,
                           warn_threshold_ratio=(WARN_THRESHOLD_RATIO if args.warn_threshold_ratio is None
                                                 else args.warn_threshold_ratio), **kw)
        opts = " ".join(f"{_FLAGS[k].split('/')[0]} {getattr(args, k):g}" for k in METHOD_OPTIONS[args.method]
                        if getattr(args, k) is not None and k != "one_pass"
                        and not (k == "clip_guard" and args.clip_guard == -1.0))
        if args.clip_guard == -1.0:
            opts += " --no-clip-guard"
        if getattr(args, "one_pass", None):
            opts += " --one-pass"
        src = (f"--qnet {Path(args.qnet).name}" if args.qnet else f"--symbol {Path(args.symbol).name}"
               if args.symbol else f"--model {name}")
        sf.producer = " ".join(f"deployq calibrate {src} --method {args.method} {opts} --profile {profile} "
                               f"--data {Path(spec).name} --images {len(x)} --seed {args.seed}".split())
        sf.preprocess = m.preprocess.to_dict()
        path = sf.save(args.out)
    except DeployqError as e:  # usage 2, bad input 3 (deployq.errors); anything else: deployq.cli.main
        print(f"deployq calibrate: error: {e}", file=sys.stderr)
        return e.exit_code
    for msg in sf.warnings:
        print(f"deployq calibrate: warning: {msg}", file=sys.stderr)
    if args.report:
        print(report(sf))
    if args.json_out:
        import json

        print(json.dumps({"scale_file": str(path), "model": sf.model_name, "profile": sf.profile,
                          "method": args.method, "images": int(len(x)), "preprocess": sf.preprocess,
                          "thresholds": {k: t.threshold for k, t in sf.tensors.items()},
                          "warnings": list(sf.warnings)}, indent=2))
    elif not args.quiet:
        print(f"wrote {path} ({len(sf.tensors)} tensors, {len(x)} images, method {args.method}, "
              f"{len(sf.warnings)} warning(s))", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deployq")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
