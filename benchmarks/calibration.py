"""Calibration benchmark (prints ratios and a table; not a test).

Timing: wall time of ``deployq.calib.calibrate`` per method over one plain hybridized fp32 inference pass over the
same images (targets: <= 1.25x minmax/ema, <= 1.5x kl/percentile/mse) and over MXNet
``quantize_net_v2(calib_mode='naive')`` on the same data (target <= 1.0).
Accuracy (needs the deployq core, ``deployq.quantize``): MNIST-5k test top-1 per method, ncnn profile,
per-channel weights, PTQ only; skipped with a note while the core is missing.

    OMP_NUM_THREADS=2 python benchmarks/calibration.py [--models resnet20 mobilenet0.25] [--per-class 100]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import mxnet as mx
import numpy as np
from deployq.calib import CALIBRATORS, apply, calibrate
from mxnet import gluon

from deployq.data import class_balanced_subset, load_mnist5k
from deployq.zoo import evaluate, get_trained

METHODS = ["minmax", "ema", "kl", "percentile", "mse"]
TARGET = {"minmax": 1.25, "ema": 1.25, "kl": 1.5, "percentile": 1.5, "mse": 1.5}


def best_of(fn, repeat=3):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def fp32_pass(net, x, bs):
    for i in range(0, len(x), bs):
        net(mx.nd.array(x[i:i + bs])).wait_to_read()


def mxnet_naive(net, x, bs):
    from mxnet.contrib.quantization import quantize_net_v2
    calib = gluon.data.DataLoader(gluon.data.ArrayDataset(x, np.zeros(len(x))), batch_size=bs)
    logging.disable(logging.WARNING)
    return quantize_net_v2(net, quantized_dtype="auto", quantize_mode="full",
                           quantize_granularity="channel-wise", calib_mode="naive", calib_data=calib,
                           num_calib_examples=len(x), ctx=mx.cpu())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mobilenet0.25", "resnet20"])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    train, test = load_mnist5k("train"), load_mnist5k("test")
    x = train.x[class_balanced_subset(train.y, args.per_class, 0)]
    print(f"{len(x)} calibration images, batch {args.batch_size}")
    for name in args.models:
        net = get_trained(name, verbose=False)
        fp32_pass(net, x[:args.batch_size], args.batch_size)
        t_fp32 = best_of(lambda net=net: fp32_pass(net, x, args.batch_size))
        t_mx = best_of(lambda name=name: mxnet_naive(get_trained(name, verbose=False), x, args.batch_size),
                       repeat=1)
        print(f"\n{name}: fp32 pass {t_fp32 * 1e3:.0f} ms, mxnet quantize_net_v2 naive {t_mx * 1e3:.0f} ms")
        print(f"{'method':<11} {'ms':>7} {'x fp32':>7} {'target':>7} {'x mxnet naive':>14}")
        for m in METHODS:
            calibrate(net, x[:args.batch_size], method=m, quiet=True)  # warm-up (graph build)
            t = best_of(lambda net=net, m=m: calibrate(net, x, method=m, quiet=True, batch_size=args.batch_size))
            print(f"{m:<11} {t * 1e3:>7.0f} {t / t_fp32:>7.2f} {TARGET[m]:>7.2f} {t / t_mx:>14.2f}")
        accuracy(name, net, x, test)


def accuracy(name, net, x, test):
    try:
        from deployq import quantize  # type: ignore[attr-defined]
    except ImportError:
        print(f"accuracy ({name}): deployq.quantize not on this branch yet; fp32 top-1 "
              f"{evaluate(net, test):.4f}; MXNet naive/entropy and ORT baselines: see peers.md")
        return
    print(f"{'accuracy ' + name:<24} top-1  (fp32 {evaluate(net, test):.4f})")
    for m in METHODS:
        qnet = quantize(get_trained(name, verbose=False), profile="ncnn", algorithm="ptq")
        sf = calibrate(qnet, x, method=m, quiet=True)
        apply(qnet, sf)
        print(f"  {m:<22} {evaluate(qnet, test):.4f}")
    for mode in ("naive", "entropy"):
        from mxnet.contrib.quantization import quantize_net_v2
        calib = gluon.data.DataLoader(gluon.data.ArrayDataset(x, np.zeros(len(x))), batch_size=64)
        q = quantize_net_v2(get_trained(name, verbose=False), quantized_dtype="auto", quantize_mode="full",
                            quantize_granularity="channel-wise", calib_mode=mode, calib_data=calib,
                            num_calib_examples=len(x), ctx=mx.cpu())
        q.hybridize(static_alloc=True, static_shape=True)
        print(f"  mxnet {mode:<16} {evaluate(q, test, batch_size=64):.4f}")


if __name__ == "__main__":
    assert set(METHODS) <= set(CALIBRATORS)
    main()
