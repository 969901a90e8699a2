"""onnxruntime latency: deployq's QDQ export vs ORT quantize_static (QDQ, per-channel, U8S8, BN folded) vs fp32.

    python benchmarks/onnx_speed.py [--model resnet20] [--repeat 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from deployq.exporters.onnx_export import export_qnet
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import deployq
from deployq.data import load_mnist5k
from deployq.layerwise import calibrate_minmax
from deployq.zoo import get_trained


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.it = iter([{"data": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


def latency_ms(path: Path, x: np.ndarray, repeat: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(10):
        s.run(None, {"data": x})
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        s.run(None, {"data": x})
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="*", default=["resnet20", "mobilenet0.25"])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    calib = load_mnist5k("train").x[:256]
    test = load_mnist5k("test").x
    for name in args.model:
        with tempfile.TemporaryDirectory() as d:
            qnet = deployq.quantize(get_trained(name, verbose=False), profile="onnx")
            calibrate_minmax(qnet, calib)
            files = export_qnet(qnet, d, name)
            ref = Path(d) / "quantize_static.onnx"
            quantize_static(str(files["fp32"]), str(ref), _Reader(calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            for bs in (1, 32):
                x = test[:bs]
                t = {k: latency_ms(p, x, args.repeat) for k, p in
                     (("deployq", files["model"]), ("quantize_static", ref), ("fp32", files["fp32"]))}
                print(f"{name} bs={bs}: deployq {t['deployq']:.3f} ms, quantize_static {t['quantize_static']:.3f} ms, "
                      f"fp32 {t['fp32']:.3f} ms | deployq/quantize_static {t['deployq'] / t['quantize_static']:.2f}x, "
                      f"deployq/fp32 {t['deployq'] / t['fp32']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
