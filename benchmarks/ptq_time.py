"""Wall time of AdaRound and block reconstruction (BRECQ + QDrop) on gluoncv's resnet18_v1 at 224x224 (issue 17's
budget: 15 minutes with 512 calibration images on the 2 shared cores).

The net has random weights (the cost does not depend on them); the calibration images are generated (smoothed
noise, seed 0). The net is quantized for ``--profile`` (default ncnn), its input ranges calibrated with
min-max, then AdaRound and BRECQ each run on a fresh copy at ``--iters`` iterations per layer / per block.
Prints the wall seconds of each (and their phases: advancing the cached activations, the before/after MSE
diagnostic (off here: 0), the training), the process's CPU seconds (all threads), the machine load
(``os.getloadavg``) before and after, and the cache dtype. deployq runs MXNet on every usable core
(``deployq.threads``; MXNet alone takes half of them).

With ``--time-budget S`` each pass gets S wall seconds (``AdaRoundConfig.time_budget``: every layer or block
runs the iterations that fit, at most ``--iters``); the iterations each unit ran are printed.

Usage: ``python benchmarks/ptq_time.py [--images 512] [--iters 100] [--size 224] [--only adaround|brecq]
[--time-budget 900]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import deployq
from deployq.layerwise import calibrate_minmax


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smoothed-noise 'photos', normalised like ImageNet inputs."""
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(n, 3, size // 8, size // 8)).astype(np.float32)
    return np.repeat(np.repeat(low, 8, axis=2), 8, axis=3) + 0.3 * rng.normal(size=(n, 3, size, size)).astype(
        np.float32)


def make_net(size: int):
    import mxnet as mx
    from gluoncv.model_zoo import get_model

    mx.random.seed(0)
    net = get_model("resnet18_v1", pretrained=False)
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, 3, size, size)))  # shapes of the deferred parameters
    return net


def load() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--profile", default="ncnn")
    ap.add_argument("--only", choices=("adaround", "brecq"), default=None)
    ap.add_argument("--time-budget", type=float, default=None, help="wall seconds per pass (default: none)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    from deployq.calib.ptq import AdaRoundConfig, adaround
    from deployq.calib.ptq.brecq import BrecqConfig, brecq

    x = images(args.images, args.size)
    results = {"images": args.images, "size": args.size, "iters": args.iters, "batch": args.batch,
               "cores": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
               "time_budget": args.time_budget, "runs": {}}
    cap = f" at most, budget {args.time_budget:g} s" if args.time_budget else ""
    print(f"resnet18_v1 {args.size}x{args.size}, {args.images} images, {args.iters} iterations{cap}, batch "
          f"{args.batch}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {load()}",
          flush=True)
    for name in ("adaround", "brecq"):
        if args.only and name != args.only:
            continue
        net = deployq.quantize(make_net(args.size), profile=args.profile)
        t = time.perf_counter()
        calibrate_minmax(net, x[:64])
        cal = time.perf_counter() - t
        before = load()
        t, c = time.perf_counter(), time.process_time()
        if name == "adaround":
            rep = adaround(net, x, AdaRoundConfig(iters=args.iters, batch_size=args.batch,
                                                  time_budget=args.time_budget), quiet=False)
        else:
            rep = brecq(net, x, BrecqConfig(iters=args.iters, batch_size=args.batch, time_budget=args.time_budget),
                        quiet=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        ph = rep["phase_seconds"]
        its = [u["iters"] for u in rep["units"]]
        row = {"seconds": wall, "cpu_seconds": cpu, "phases": ph, "units": len(rep["units"]), "iters": its,
               "cache_dtype": rep["cache_dtype"],
               "load_before": before, "load_after": load(), "calibration_seconds": cal}
        results["runs"][name] = row
        print(f"{name:<9} {wall:7.1f} s wall ({wall / 60:.1f} min), {cpu:.1f} s CPU (all threads) for "
              f"{len(rep['units'])} units: advance "
              f"{ph['advance']:.1f} s, mse {ph['mse']:.1f} s, train {ph['train']:.1f} s; cache "
              f"{rep['cache_dtype']}; {before} -> {row['load_after']}; iterations per unit {its}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
