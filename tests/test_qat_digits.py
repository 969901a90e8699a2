"""QAT beats PTQ at 4 bits on scikit-learn digits (1x8x8), with a small Conv-BN-ReLU x2 + Dense CNN.

4-bit weights (per-tensor, BN folded: fake BN) and 4-bit signed inputs, ``custom`` profile; PTQ = same config,
min/max-calibrated ranges (10 images/class), no training; QAT = PTQ + 6 epochs SGD (lr 0.05) with deployq.Trainer.
Measured (``python tests/test_qat_digits.py 4``, 2 shared cores, 400 test images, 1 image = 0.25 pp):

    seed 0: fp32 92.75  PTQ 89.00  QAT 91.75  margin +2.75 pp
    seed 1: fp32 93.50  PTQ 91.25  QAT 92.50  margin +1.25 pp
    seed 2: fp32 94.00  PTQ 93.50  QAT 94.25  margin +0.75 pp
    seed 3: fp32 93.75  PTQ 91.00  QAT 92.00  margin +1.00 pp

Wider nets (8/16 or 16/32 channels) lose < 1 pp at 4-bit PTQ on this easy set, so the margin drowns in noise;
hence the tiny 4/8-channel CNN. The test runs seeds 0 and 1 (mean measured margin 2.0 pp) and asserts a mean
margin of at least 0.75 pp and QAT >= PTQ on each seed.
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
           "quant_scheme": {"weight": "per_tensor_symmetric"}, "fake_bn": True}]
#: Mean QAT - PTQ top-1 margin asserted over SEEDS (fraction; measured 0.020 on seeds 0 and 1).
MARGIN = 0.0075
SEEDS = (0, 1)
CH = (4, 8)
QAT_EPOCHS, QAT_LR = 6, 0.05


def make_net() -> nn.HybridSequential:
    net = nn.HybridSequential()
    net.add(nn.Conv2D(CH[0], 3, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv2D(CH[1], 3, strides=2, padding=1, use_bias=False), nn.BatchNorm(), nn.Activation("relu"),
            nn.Dense(10))
    return net


def train(net: gluon.HybridBlock, epochs: int, lr: float, seed: int, trainer_cls=gluon.Trainer) -> None:
    data = load_digits("train")
    tr = trainer_cls(net.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9, "wd": 1e-4})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for ep in range(epochs):
        for xb, yb in batches(data.x, data.y, 64, shuffle=True, seed=seed * 100 + ep):
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
    train(net, 10, 0.1, seed)
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
    train(qnet, QAT_EPOCHS, QAT_LR, seed, deployq.Trainer)
    return fp32, ptq, evaluate(qnet, test)


def test_qat_beats_ptq() -> None:
    results = [run(s) for s in SEEDS]
    for fp32, ptq, qat in results:
        assert fp32 > 0.9, results
        assert ptq < fp32, results  # 4-bit PTQ does lose accuracy here
        assert qat >= ptq, results
    margin = float(np.mean([qat - ptq for _, ptq, qat in results]))
    assert margin >= MARGIN, (margin, results)


if __name__ == "__main__":
    import sys
    import time

    for s in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        t = time.time()
        f, p, q = run(s)
        print(f"seed {s}: fp32 {f:.4f} PTQ {p:.4f} QAT {q:.4f} margin {100 * (q - p):+.2f} pp ({time.time() - t:.1f}s)",
              flush=True)
