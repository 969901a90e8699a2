"""MNIST-5k top-1 in ncnn's runtime: fp32, deployq PTQ per calibration method (``deployq.calib``: minmax, ema, kl,
percentile, mse; each exported and run in ncnn), deployq QAT (``deployq demo``'s recipe: fake BN with the fp32
statistics frozen, 2 epochs SGD with cosine lr from 1e-3, from min-max PTQ), beside MXNet
``quantize_net_v2(calib_mode='naive')`` and onnxruntime ``quantize_static`` (MinMax, per-channel, QDQ) on the same
model and calibration images, plus ncnn fp32 vs int8 latency; then whether each target holds (QAT >= fp32 - 0.2
points, every PTQ method >= fp32 - 0.5 points, deployq above every peer on mobilenet0.25).
Usage: ``python benchmarks/ncnn_accuracy.py [model ...]`` (several minutes on 2 cores)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from deployq.exporters.ir import mxnet_lower
from deployq.exporters.ncnn.export import balanced_images, export_qnet, minmax_calibrate, qnet_graphs
from deployq.exporters.ncnn.runtime import run
from mxnet import gluon
from peers import ort_static

import deployq
from deployq.data import load_mnist5k
from deployq.demo import QAT_CONFIG
from deployq.demo import qat as demo_qat
from deployq.zoo import get_trained, predict


def ncnn_top1(files: dict[str, Path], key: str, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run(files[f"{key}_param"], files[f"{key}_bin"], x).argmax(1) == y))


def latency_ms(files: dict[str, Path], key: str, x: np.ndarray, reps: int = 300, packing: bool = False) -> float:
    """ms per image, batch 1, 1 thread (includes the Python Mat/extractor overhead of ``run``)."""
    run(files[f"{key}_param"], files[f"{key}_bin"], x[:20], packing=packing)  # warm-up
    t = time.perf_counter()
    run(files[f"{key}_param"], files[f"{key}_bin"], x[:reps], packing=packing)
    return (time.perf_counter() - t) / reps * 1e3


METHODS = ("minmax", "ema", "kl", "percentile", "mse")


def ptq(name: str, calib: np.ndarray, config: list | None = None):
    net = get_trained(name, verbose=False)
    deployq.quantize(net, config, profile="ncnn")
    minmax_calibrate(net, calib)
    return net


def ptq_method(name: str, calib: np.ndarray, method: str):
    """PTQ with ``deployq.calib``: calibrate the quantized net's fp32 activations, apply the scale file."""
    import warnings

    from deployq import calib as dcalib

    net = get_trained(name, verbose=False)
    deployq.quantize(net, profile="ncnn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip warnings: the table shows what they cost
        sf = dcalib.calibrate(net, calib, method=method, profile="ncnn", quiet=True, model_name=name)
    dcalib.apply(net, sf)
    return net


def qat(name: str, calib: np.ndarray, epochs: float = 2.0, lr: float = 1e-3):
    """``deployq demo``'s QAT (``deployq.demo.QAT_CONFIG``, ``deployq.demo.qat``) from min-max PTQ."""
    net = ptq(name, calib, QAT_CONFIG)
    net.hybridize(static_alloc=True)
    demo_qat(net, epochs, lr, quiet=True)
    return net


def mxnet_naive(name: str, calib: np.ndarray, test) -> float:
    from mxnet.contrib.quantization import quantize_net_v2

    net = get_trained(name, verbose=False)
    data = gluon.data.DataLoader(gluon.data.ArrayDataset(calib, np.zeros(len(calib))), batch_size=32)
    qnet = quantize_net_v2(net, quantized_dtype="auto", quantize_mode="full", quantize_granularity="channel-wise",
                           calib_mode="naive", calib_data=data, num_calib_examples=len(calib), ctx=mx.cpu())
    return float(np.mean(predict(qnet, test.x).argmax(1) == test.y))


def main(models: list[str]) -> None:
    test = load_mnist5k("test")
    calib = balanced_images(100)  # 1000 class-balanced train images
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in models:
            t0 = time.time()
            net = ptq(name, calib)
            files = export_qnet(net, tmp / f"{name}-ptq", name)
            fp32 = ncnn_top1(files, "fp32", test.x, test.y)
            g, _ = qnet_graphs(net, name)
            mx_fp32 = float(np.mean(mxnet_lower.run(g, test.x)["output"].argmax(1) == test.y))
            lat = (latency_ms(files, "fp32", test.x), latency_ms(files, "int8", test.x),
                   latency_ms(files, "fp32", test.x, packing=True), latency_ms(files, "int8", test.x, packing=True))
            per_method = {}
            for method in METHODS:
                mfiles = export_qnet(ptq_method(name, calib, method), tmp / f"{name}-{method}", name)
                per_method[method] = ncnn_top1(mfiles, "int8", test.x, test.y)
                print(f"{name}: PTQ {method}: ncnn int8 top-1 {per_method[method]:.4f}", flush=True)
            qnet = qat(name, calib)
            qfiles = export_qnet(qnet, tmp / f"{name}-qat", name)
            qat_acc = ncnn_top1(qfiles, "int8", test.x, test.y)
            qat_sim = float(np.mean(predict(qnet, test.x).argmax(1) == test.y))
            mxq = mxnet_naive(name, calib, test)
            ortq = ort_static(name, calib, test, tmp)
            rows.append({"model": name, "mx_fp32": mx_fp32, "fp32": fp32, "ptq": per_method, "qat": qat_acc,
                         "qat_sim": qat_sim, "mx_naive": mxq, "ort": ortq, "lat": lat, "s": time.time() - t0})
    print("\nMNIST-5k test top-1 (1000 images); ncnn = PyPI ncnn runtime, 1 thread, fp16/bf16 off, packing off "
          "(latency also with packing on); PTQ = deployq.calib method, QAT from min-max PTQ")
    head = ("model", "MXNet fp32", "ncnn fp32", *(f"PTQ {m}" for m in METHODS), "ncnn QAT", "QAT sim",
            "MXNet naive", "ORT static", "fp32 ms", "int8 ms", "fp32 ms pack", "int8 ms pack", "s")
    print(" | ".join(head))
    for r in rows:
        accs = [r["mx_fp32"], r["fp32"], *(r["ptq"][m] for m in METHODS), r["qat"], r["qat_sim"], r["mx_naive"],
                r["ort"]]
        print(" | ".join([r["model"], *(f"{v:.4f}" for v in accs), *(f"{v:.3f}" for v in r["lat"]), f"{r['s']:.0f}"]))
    print()
    for r in rows:
        f = r["fp32"]
        ok = r["qat"] >= f - 0.002 - 1e-9
        print(f"{r['model']}: QAT - fp32 = {100 * (r['qat'] - f):+.1f} points (target >= -0.2): "
              f"{'holds' if ok else 'MISSED'}")
        for m in METHODS:
            ok = r["ptq"][m] >= f - 0.005 - 1e-9
            print(f"{r['model']}: PTQ {m} - fp32 = {100 * (r['ptq'][m] - f):+.1f} points (target >= -0.5): "
                  f"{'holds' if ok else 'MISSED'}")
        if r["model"] == "mobilenet0.25":
            peer = max(r["mx_naive"], r["ort"])
            for label, v in [("QAT", r["qat"]), *((f"PTQ {m}", r["ptq"][m]) for m in METHODS)]:
                print(f"{r['model']}: {label} {v:.4f} vs best peer {peer:.4f} (MXNet naive {r['mx_naive']:.4f}, "
                      f"ORT static {r['ort']:.4f}): {'above every peer' if v > peer else 'NOT above every peer'}")
            v = r["ptq"]["kl"]
            print(f"{r['model']}: deployq's default calibration (kl, `deployq calibrate`) {v:.4f} vs best peer "
                  f"{peer:.4f}: {'above every peer' if v > peer else 'NOT above every peer'}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["mobilenet0.25", "resnet20"])
