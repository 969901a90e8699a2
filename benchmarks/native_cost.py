"""What each compiled part of deployq/native/ buys on a realistic job, against its NumPy/MXNet fallback.

Jobs (gluoncv resnet18_v1, random weights, classes=1000, 3x224x224):

- ``qat``: one QAT training step at batch 32 (ncnn profile, algorithm ``qat``, the default config: fake BN,
  hybridized, SGD with momentum) with the fused fake-quant operators (``fakequant.cc``) against the MXNet-operator
  formulation (``deployq.use_native(net, False)``). Two nets with the same weights, steps interleaved.
- ``calib``: ``deployq.calib.calibrate`` over 512 generated images (batch 64) per method, with every part on,
  then with one part off at a time: ``rawstats`` (the in-place reader ``rawstats.cc``; the in-graph operator
  instead), ``calibops`` (the in-graph operator ``calibops.cc`` and the reader; activations read on the host and
  reduced in NumPy instead). (A C++ AVX KL search measured 6.5% of the kl job here and was
  deleted: the KL search runs in NumPy.)

The machine is shared with other processes: every variant of a job runs once per round, rounds interleaved, and
the median over rounds is printed (with the spread: min-max). Ratio = time without the part / time with it
("buys" = 1 - with/without, the share of the job the part saves).

    OMP_NUM_THREADS=2 python benchmarks/native_cost.py [--jobs qat calib] [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import mxnet as mx
import numpy as np
from mxnet import gluon
from qat_step import Stepper  # (benchmarks/ is on sys.path when run as a script)

import deployq
from deployq.zoo import get_model

SHAPE = (3, 224, 224)


def make_net(quantized: bool) -> gluon.HybridBlock:
    """resnet18_v1 (classes=1000) with seeded random weights, optionally QAT-quantized (ncnn)."""
    mx.random.seed(0)
    net = get_model("resnet18_v1", classes=1000)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, *SHAPE)))
    if quantized:
        deployq.quantize(net, None, "ncnn", "qat")
    return net


class QATStep(Stepper):
    """One QAT net (fused operators or MXNet operators) with its trainer and a fixed random batch
    (``qat_step.Stepper``); ``run(n)`` returns n step times (seconds)."""

    def __init__(self, native: bool, batch: int = 32):
        net = deployq.use_native(make_net(True), native)
        if ("dq_act_quant" in net(mx.sym.var("data")).tojson()) != native:
            raise SystemExit(f"fused operators {'unavailable' if native else 'still used'}: nothing to compare")
        net.hybridize(static_alloc=True, static_shape=True)
        super().__init__(net, batch, SHAPE, 1000)


def qat_job(rounds: int, steps: int) -> list[tuple[str, list[float], list[float]]]:
    """[("fakequant", times with, times without)]: per round, the median of ``steps`` steps of each net."""
    nets = {True: QATStep(True), False: QATStep(False)}
    for st in nets.values():
        st.run(2)  # warm-up: graph build, memory planning
    per: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for native in (True, False) if r % 2 == 0 else (False, True):
            per[native].append(statistics.median(nets[native].run(steps)))
    return [("fakequant (QAT step, batch 32)", per[True], per[False])]


@contextlib.contextmanager
def part_off(part: str) -> Iterator[None]:
    """Turn one compiled part off for the duration (its fallback runs instead)."""
    from deployq.calib import api

    from deployq.native import rawstats

    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    if part == "rawstats":
        patch(rawstats, "load", lambda: None)
    elif part == "calibops":
        patch(api, "NATIVE", False)
    elif part != "all":
        raise ValueError(part)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


#: the compiled parts every calibration method runs
CALIB_PARTS = ("rawstats", "calibops")
METHODS = ("minmax", "ema", "percentile", "mse", "kl")


def calib_job(rounds: int, methods: list[str], images: int = 512) -> list[tuple[str, list[float], list[float]]]:
    """Per method and part: (label, times with every part, times with that part off)."""
    from deployq.calib import api, calibrate

    net = make_net(False)
    net.hybridize(static_alloc=True)
    x = np.random.default_rng(1).standard_normal((images, *SHAPE)).astype(np.float32)

    taps: dict[str, list] = {}  # the cached tap per part setting (its in-place reader state depends on it)

    def timed(method: str, part: str) -> tuple[float, dict]:
        api._TAP_CACHE[:] = taps.get(part, [])
        with part_off(part), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            sf = calibrate(net, x, method, "ncnn", quiet=True, batch_size=64)
            t = time.perf_counter() - t
        taps[part] = list(api._TAP_CACHE)
        return t, {k: r.threshold for k, r in sf.tensors.items()}

    variants = [(m, p) for m in methods for p in ["all", *CALIB_PARTS]]
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    ref = {m: timed(m, "all")[1] for m in methods}
    for v in variants:  # warm-up of every variant: graph builds, library loads, the reader's checks
        timed(*v)
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            t, thresholds = timed(*v)
            if thresholds != ref[v[0]]:
                print(f"WARNING: {v[0]} with {v[1]} off: other thresholds than with every part on", flush=True)
            times[v].append(t)
            print(f"  round {r}: {v[0]:10s} {v[1]:9s} off {t:6.2f} s", flush=True)
    return [(f"{p} ({m}, 512 images)", times[(m, "all")], times[(m, p)])
            for m in methods for p in CALIB_PARTS]


def report(rows: list[tuple[str, list[float], list[float]]], out: Callable[[str], None] = print) -> None:
    out(f"{'part (job)':40s} {'with [s]':>16s} {'without [s]':>16s} {'ratio':>6s} {'buys':>6s}")
    for label, w, wo in rows:
        mw, mwo = statistics.median(w), statistics.median(wo)
        out(f"{label:40s} {mw:7.2f} ({min(w):.2f}-{max(w):.2f}) {mwo:7.2f} ({min(wo):.2f}-{max(wo):.2f}) "
            f"{mwo / mw:5.2f}x {100 * (1 - mw / mwo):5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", nargs="+", choices=["qat", "calib"], default=["qat", "calib"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per job (median over rounds)")
    ap.add_argument("--steps", type=int, default=3, help="QAT steps per net and round (median per round)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = ap.parse_args()
    print(f"median over {args.rounds} interleaved rounds (min-max in brackets); OMP_NUM_THREADS="
          f"{__import__('os').environ.get('OMP_NUM_THREADS', '?')}", flush=True)
    if "qat" in args.jobs:
        report(qat_job(args.rounds, args.steps))
    if "calib" in args.jobs:
        report(calib_job(args.rounds, args.methods))


if __name__ == "__main__":
    main()
