"""``deployq optimize --target-drop X``: the cheapest post-training pipeline that meets an accuracy drop
(``deployq.calib.ptq.pipeline``: calibrators, CLE + bias correction, AdaRound, AdaRound + QDrop, block
reconstruction (BRECQ + QDrop), fp32 fallback), scored on validation images; prints what each step bought and
saves the chosen quantized net (``deployq.save``). Exit 0 when the target is met, 4 when not (the best net is
still written)."""

from __future__ import annotations

import argparse
import json
import sys

from . import preprocess

_STEP_HELP = ("comma-separated subset of: calibrate, cle+bc, adaround, adaround+qdrop, brecq, fallback "
              "(default: all)")


def register(subparsers) -> argparse.ArgumentParser:
    from .images import add_data_arguments
    from .modelargs import add_model_arguments

    p = subparsers.add_parser(
        "optimize", help="cheapest PTQ pipeline meeting a target accuracy drop -> quantized net",
        description="Try post-training pipelines cheapest first (calibration methods, cross-layer equalization + "
                    "bias correction, AdaRound, AdaRound + QDrop, block reconstruction with QDrop, fp32 fallback of "
                    "the most sensitive layers), score each on the validation images in deployq's simulation of "
                    "the engine, stop at the "
                    "first whose accuracy drop is at most --target-drop, and save that quantized net.")
    add_model_arguments(p, qnet=False)
    add_data_arguments(p, help_text="validation images with labels (class subfolders or an .npz with 'y'); "
                                    "default for the built-in models: MNIST-5k test")
    p.add_argument("--calib-data", default=None, help="calibration images (default: --data; MNIST-5k train for "
                                                      "the built-in models)")
    preprocess.add_arguments(p)
    p.add_argument("--profile", default="ncnn", help="engine profile (ncnn, tengine, onnx, custom)")
    p.add_argument("--six-bit", action="store_true", help="ncnn: 6-bit weights on 3x3 stride-1 convs (winograd)")
    p.add_argument("--config", default=None, help="config list JSON file (e.g. 4-bit weights on custom)")
    p.add_argument("--target-drop", type=float, required=True, help="accepted accuracy drop (0.01 = 1 point)")
    p.add_argument("--images", type=int, default=1000, help="at most this many validation images")
    p.add_argument("--calib-images", type=int, default=256, help="at most this many calibration images")
    p.add_argument("--methods", default="minmax,kl,aciq,mse,eq", help="calibration methods, in the order tried")
    p.add_argument("--steps", default=None, help=_STEP_HELP)
    p.add_argument("--adaround-iters", type=int, default=1000, help="AdaRound iterations per layer (at most, "
                                                                    "under --time-budget)")
    p.add_argument("--adaround-batch", type=int, default=32, help="AdaRound batch size")
    p.add_argument("--qdrop", type=float, default=0.5, help="QDrop probability of the adaround+qdrop and brecq "
                                                            "steps")
    p.add_argument("--brecq-iters", type=int, default=None, help="block reconstruction iterations per block "
                                                                "(default: --adaround-iters)")
    p.add_argument("--time-budget", type=float, default=15.0, metavar="MINUTES",
                   help="wall minutes for each learned step (adaround, adaround+qdrop, brecq): each layer or block "
                        "runs the iterations that fit, the same for all where the estimate holds, at most "
                        "--adaround-iters/--brecq-iters, at least 10; 0: no budget, exactly those iterations "
                        "(default 15)")
    p.add_argument("--block-layers", type=int, default=4, help="brecq: at most this many layers of a plain chain "
                                                               "per block")
    p.add_argument("--max-fp32-layers", type=int, default=4, help="fallback: at most this many fp32 layers")
    p.add_argument("-o", "--out", required=True, help="saved net: <OUT>.params + <OUT>.deployq.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no step lines")
    p.add_argument("--json", dest="json_out", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=run)
    return p


def _profile(args: argparse.Namespace):
    from .errors import UsageError
    from .profiles import load_profile

    try:
        prof = load_profile(args.profile)
    except ValueError as e:
        raise UsageError(str(e), where="--profile") from None
    if args.six_bit:
        if prof.name != "ncnn":
            raise UsageError("--six-bit applies to --profile ncnn only")
        prof = prof.with_options(winograd_3x3="six_bit")
    return prof


def _config(path: str | None) -> list | None:
    from .config import load_config_list

    return None if path is None else load_config_list(path)


def run(args: argparse.Namespace) -> int:
    from .api import save
    from .calib.ptq.adaround import AdaRoundConfig
    from .calib.ptq.brecq import BrecqConfig
    from .calib.ptq.pipeline import STEPS, optimize
    from .errors import EXIT_VERIFY, UsageError
    from .modelargs import load_model
    from .sensitivity import _images

    if args.brecq_iters is None:
        args.brecq_iters = args.adaround_iters
    for name in ("images", "calib_images", "adaround_iters", "adaround_batch", "brecq_iters", "block_layers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.time_budget < 0:
        raise UsageError(f"--time-budget must be >= 0 minutes (0: no budget), got {args.time_budget:g}")
    budget = args.time_budget * 60 if args.time_budget > 0 else None
    if not 0 <= args.qdrop < 1:
        raise UsageError(f"--qdrop must be in [0, 1), got {args.qdrop:g}")
    steps = tuple(s.strip() for s in args.steps.split(",")) if args.steps else STEPS
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise UsageError(f"--steps: unknown step(s) {', '.join(bad)}; {_STEP_HELP}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    prof, cfg = _profile(args), _config(args.config)
    m = load_model(args, quiet=True)
    x, y = _images(args.data, m, "test", args.images, args.skip_bad_images)
    if y is None:
        raise UsageError("optimize scores accuracy: the validation images need labels (class subfolders or 'y')")
    xc, _ = _images(args.calib_data or args.data, m, "train", args.calib_images, args.skip_bad_images)
    first = [m.net]

    def make_net():
        return first.pop() if first else load_model(args, quiet=True).net

    def line(r) -> None:
        if not args.quiet and not args.json_out:
            from tqdm import tqdm

            its = r.detail.get("iters")
            its = "" if not its else f"  {min(its)}-{max(its)} it" if min(its) < max(its) else f"  {its[0]} it"
            tqdm.write(f"{r.step:<18} accuracy {r.accuracy:.4f}  drop {r.drop:+.4f}  gain {r.gain:+.4f}  "
                       f"{r.seconds:6.1f}s{its}  {'met' if r.met else ''}".rstrip(), file=sys.stderr)

    try:
        res = optimize(make_net, xc, x, y, args.target_drop, prof, cfg, methods, steps,
                       AdaRoundConfig(iters=args.adaround_iters, batch_size=args.adaround_batch, time_budget=budget),
                       args.qdrop, args.max_fp32_layers, quiet=args.quiet, on_step=line,
                       brecq_config=BrecqConfig(iters=args.brecq_iters, batch_size=args.adaround_batch,
                                                qdrop=args.qdrop, max_block_layers=args.block_layers,
                                                time_budget=budget))
    except ValueError as e:
        raise UsageError(str(e)) from None
    params, meta = save(res.net, args.out, m.name, preprocess=m.preprocess)
    if args.json_out:
        print(json.dumps({**res.summary(), "model": m.name, "profile": prof.name, "images": int(len(x)),
                          "calib_images": int(len(xc)), "params": str(params), "meta": str(meta)},
                         indent=2, default=float))
    elif not args.quiet:
        acc = next(r.accuracy for r in res.steps if r.step == res.chosen)
        print(f"{'met' if res.met else 'NOT met'}: {res.chosen}, accuracy {acc:.4f} (fp32 "
              f"{res.fp32_accuracy:.4f}, target drop {res.target_drop:g}); wrote {params} and {meta}")
    return 0 if res.met else EXIT_VERIFY
