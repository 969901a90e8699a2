"""``deployq calibrate``: calibrate a built-in model on a class-balanced MNIST-5k subset, write scales.json.

The lead's ``deployq/cli.py`` calls ``register(subparsers)``; ``python -m deployq.calib.cli`` also works.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .base import CALIBRATORS


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="post-training calibration of activation ranges -> scale file")
    p.add_argument("model", help="built-in model name (mobilenet0.25, resnet20)")
    p.add_argument("--method", default="kl", choices=sorted(CALIBRATORS))
    p.add_argument("--profile", default="ncnn")
    p.add_argument("--num-sample", type=int, default=10, help="calibration images per class (default 10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile", type=float, default=None, help="for --method percentile (default 99.99)")
    p.add_argument("--out", default="scales.json")
    p.add_argument("--report", action="store_true", help="print the per-layer table")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..data import load_mnist5k
    from ..zoo import get_trained
    from .api import calibrate, class_balanced_sampler, report

    net = get_trained(args.model, verbose=not args.quiet)
    train = load_mnist5k("train")
    x = train.x[class_balanced_sampler(train.y, args.num_sample, args.seed)]
    kw = {} if args.percentile is None else {"percentile": args.percentile}
    with warnings.catch_warnings():
        if args.quiet:
            warnings.simplefilter("ignore")
        sf = calibrate(net, x, method=args.method, profile=args.profile, quiet=args.quiet,
                       batch_size=args.batch_size, model_name=args.model, **kw)
    sf.producer = (f"deployq calibrate {args.model} --method {args.method} --profile {args.profile} "
                   f"--num-sample {args.num_sample} --seed {args.seed}")
    path = sf.save(args.out)
    if args.report:
        print(report(sf))
    if not args.quiet:
        print(f"wrote {path} ({len(sf.tensors)} tensors, {len(x)} images, method {args.method})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deployq")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
