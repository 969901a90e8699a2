"""onnxruntime latency: deployq's QDQ export vs ORT quantize_static (QDQ, per-channel, U8S8, BN folded) vs fp32.

    python benchmarks/onnx_speed.py [--model resnet20 mobilenet0.25] [--repeat 300] [--threads 2]

The three sessions run interleaved (one run of each per round, the rounds cycling through every order of the
three, so that each model follows each other equally often) so that load from other processes on the machine
affects them alike; latencies are medians over the rounds, ratios the
medians of the per-round ratios. Also prints
the ops onnxruntime runs after its default optimizations (what it fused into integer kernels), and the top-1
agreement of the QDQ model with deployq's simulation.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from deployq.exporters.onnx.export import export_qnet
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import deployq
from deployq.data import load_mnist5k
from deployq.layerwise import calibrate_minmax, run_layers
from deployq.zoo import get_trained

NAMES = ("deployq", "quantize_static", "fp32")


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.it = iter([{"data": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.it, None)


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # idle sessions must not keep their threads spinning: the interleaved sessions would compete for the cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fused_ops(path: Path, threads: int) -> str:
    """The ops onnxruntime runs (default optimizations), most frequent first."""
    opt = path.with_suffix(".ort.onnx")
    session(path, threads, opt)
    c = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    return ", ".join(f"{k} {v}" for k, v in c.most_common())


def latencies_ms(paths: dict[str, Path], x: np.ndarray, repeat: int, threads: int) -> dict[str, np.ndarray]:
    """Per-round latency (ms) of each model, the rounds interleaved."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, {"data": x})
    orders, times = list(itertools.permutations(sessions)), {k: [] for k in sessions}
    for r in range(repeat):
        for k in orders[r % len(orders)]:
            t = time.perf_counter()
            sessions[k].run(None, {"data": x})
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * np.array(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="*", default=["resnet20", "mobilenet0.25"])
    ap.add_argument("--repeat", type=int, default=600, help="rounds at batch 1 (batch 32: a fifth, at least 30)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
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
            paths = dict(zip(NAMES, (files["model"], ref, files["fp32"]), strict=True))
            sim, _ = run_layers(qnet, test)
            y = session(files["model"], args.threads).run(None, {"data": test})[0]
            print(f"{name}: deployq QDQ vs simulation: top-1 agreement {(y.argmax(1) == sim.argmax(1)).mean():.4f} "
                  f"({len(test)} images, default optimizations)")
            for k in NAMES[:2]:
                print(f"  onnxruntime runs ({k}): {fused_ops(paths[k], args.threads)}")
            for bs in (1, 32):
                r = latencies_ms(paths, test[:bs], args.repeat if bs == 1 else max(30, args.repeat // 5),
                                 args.threads)
                t = {k: float(np.median(v)) for k, v in r.items()}
                # ratios: the median of per-round ratios (the three runs of a round see the same machine load)
                vs_qs = float(np.median(r["deployq"] / r["quantize_static"]))
                vs_fp = float(np.median(r["deployq"] / r["fp32"]))
                print(f"{name} bs={bs}: deployq {t['deployq']:.3f} ms, quantize_static {t['quantize_static']:.3f} ms, "
                      f"fp32 {t['fp32']:.3f} ms | deployq/quantize_static {vs_qs:.2f}x, deployq/fp32 {vs_fp:.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
