"""Time of a QAT training step over an fp32 training step (mobilenet0.25, 3x32x32, batch 64, hybridized).

Prints the median step time of fp32, QAT (ncnn profile, fake BN = the profile default, running statistics
updated from the batch statistics of the raw conv), QAT with the statistics frozen (``bn_freeze_step: 0``, the
``deployq demo`` recipe: no statistics conv) and QAT without fake BN (``fake_bn: False``), and their ratios to
fp32 (target: QAT <= 1.5x). Usage:
``OMP_NUM_THREADS=2 python benchmarks/qat_step.py [--steps 20] [--warmup 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import deployq
from deployq.zoo import get_model


def make_net(config: list[dict] | None, quantized: bool) -> gluon.HybridBlock:
    mx.random.seed(0)
    net = get_model("mobilenet0.25")
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    if quantized:
        deployq.quantize(net, config, "ncnn", "qat")
    net.hybridize(static_alloc=True, static_shape=True)
    return net


class Stepper:
    """One net with its trainer and a fixed random batch; ``run(n)`` returns n step times (seconds)."""

    def __init__(self, net: gluon.HybridBlock, batch: int = 64, shape: tuple[int, ...] = (3, 32, 32),
                 classes: int = 10):
        trainer_cls = deployq.Trainer if deployq.quant_layers(net) else gluon.Trainer
        self.net, self.batch = net, batch
        self.trainer = trainer_cls(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        rng = np.random.default_rng(0)
        self.x = mx.nd.array(rng.standard_normal((batch, *shape)).astype(np.float32))
        self.y = mx.nd.array(rng.integers(0, classes, batch))

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            mx.nd.waitall()
            t = time.perf_counter()
            with autograd.record():
                loss = self.loss_fn(self.net(self.x), self.y)
            loss.backward()
            self.trainer.step(self.batch, ignore_stale_grad=True)
            mx.nd.waitall()
            times.append(time.perf_counter() - t)
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant (in rounds of 5)")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    variants = {
        "fp32": (None, False),
        "QAT (fake BN)": (None, True),
        "QAT (frozen BN stats)": ([{"op_types": ["Conv2D", "Dense"], "quant_types": ["weight", "input"],
                                    "bn_freeze_step": 0}], True),
        "QAT (fake_bn: False)": ([{"op_types": ["Conv2D", "Dense"], "quant_types": ["weight", "input"],
                                   "fake_bn": False}], True),
    }
    steppers = {name: Stepper(make_net(cfg, q)) for name, (cfg, q) in variants.items()}
    for st in steppers.values():
        st.run(args.warmup)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.steps // 5):  # interleaved rounds, so load from other processes hits all variants alike
        for name, st in steppers.items():
            times[name] += st.run(5)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["fp32"]
    for name, t in med.items():
        print(f"{name:23s} {1000 * t:8.1f} ms/step   {t / base:5.2f}x fp32")
    print(f"QAT/fp32 ratio: {med['QAT (fake BN)'] / base:.2f}x (target <= 1.5x); frozen BN statistics: "
          f"{med['QAT (frozen BN stats)'] / base:.2f}x; without fake BN: {med['QAT (fake_bn: False)'] / base:.2f}x")


if __name__ == "__main__":
    main()
