"""deployq's default calibration (``deployq calibrate``: ``DEFAULT_METHOD``, mse) against ncnn2table's best
method (ACIQ) over several draws of the calibration images (issue 17, target (a)), ncnn 8-bit, in ncnn's runtime.

``benchmarks/ptq_algorithms.py`` compares the methods on one draw (128 class-balanced images, seed 0), where
they differ by 1-5 of the 1000 test images. This benchmark repeats the comparison on ``--draws`` class-balanced
draws (seeds 0..draws-1) of ``--calib`` MNIST-5k training images, all 1000 MNIST-5k test images, and prints per
draw and per model the accuracy of each deployq method (exported, run in ncnn's runtime) and of ncnn2table's
``aciq`` (``ncnn2table_peer.py``: caffe2ncnn -> ncnn2table -> ncnn2int8 -> ncnn), with their fidelity to the
fp32 net (top-1 agreement, the logits' SQNR), then the mean and standard deviation per method and the mean
difference default - peer with its standard error.

Usage: ``NCNN_BIN=... python benchmarks/calib_draws.py [--draws 8] [--calib 128] [--methods kl,aciq,mse,minmax]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import ncnn2table_peer
import numpy as np
from deployq.calib import DEFAULT_METHOD
from deployq.calib.ptq.pipeline import build
from deployq.exporters.ncnn.export import export_qnet
from deployq.exporters.ncnn.runtime import run

from deployq.data import class_balanced_subset, load_mnist5k
from deployq.zoo import get_trained, predict

DEFAULT = DEFAULT_METHOD
KEYS = ("accuracy", "fp32_agreement", "sqnr_db")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mobilenet0.25", "resnet20"])
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--methods", default="kl,aciq,mse,minmax")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    why = ncnn2table_peer.tools_missing()
    if why:
        print(f"ncnn2table rows skipped: {why}", file=sys.stderr)
    tr, te = load_mnist5k("train"), load_mnist5k("test")
    x, y = te.x, te.y
    res: dict = {"draws": args.draws, "calib_images": args.calib, "test_images": len(x), "models": {}}
    for name in args.models:
        fp = float(np.mean(predict(get_trained(name, verbose=False), x).argmax(1) == y))
        ref = predict(get_trained(name, verbose=False), x)
        rows = {m: {k: [] for k in KEYS} for m in methods + ([] if why else ["ncnn2table aciq"])}
        print(f"{name}: fp32 {fp:.4f}", flush=True)
        for seed in range(args.draws):
            xc = tr.x[class_balanced_subset(tr.y, -(-args.calib // 10), seed)[:args.calib]]
            line = []
            for m in methods:
                net, _ = build(get_trained(name, verbose=False), xc, "ncnn", None, m)
                with tempfile.TemporaryDirectory() as d:
                    files = export_qnet(net, d, name)
                    logits = run(files["int8_param"], files["int8_bin"], x)
                r = {"accuracy": float(np.mean(logits.argmax(1) == y)),
                     "agreement": float(np.mean(logits.argmax(1) == predict(net, x).argmax(1))),
                     **ncnn2table_peer.fidelity(logits, ref)}
                for k in KEYS:
                    rows[m][k].append(r[k])
                line.append(f"{m} {r['accuracy']:.4f} (fp32 agreement {r['fp32_agreement']:.4f}, SQNR "
                            f"{r['sqnr_db']:.1f} dB; simulation agreement {r['agreement']:.4f})")
            if not why:
                peer = ncnn2table_peer.ncnn2table_rows(name, xc, x, y, methods=("aciq",))["ncnn2table aciq"]
                for k in KEYS:
                    rows["ncnn2table aciq"][k].append(peer[k])
                line.append(f"ncnn2table aciq {peer['accuracy']:.4f} (fp32 agreement {peer['fp32_agreement']:.4f}, "
                            f"SQNR {peer['sqnr_db']:.1f} dB)")
            print(f"  draw {seed}: " + ", ".join(line), flush=True)
        res["models"][name] = {"fp32": fp, "rows": rows}
        print(f"{name} over {args.draws} draws of {args.calib} images (fp32 {fp:.4f}):")
        for m, r in rows.items():
            v = r["accuracy"]
            print(f"  {m:<16} top-1 mean {np.mean(v):.4f}  std {np.std(v):.4f}  min {min(v):.4f}  max {max(v):.4f};"
                  f"  fp32 agreement {np.mean(r['fp32_agreement']):.4f}; logits SQNR {np.mean(r['sqnr_db']):.2f} dB")
        if not why:
            for k in KEYS:
                d = np.array(rows[DEFAULT][k]) - np.array(rows["ncnn2table aciq"][k])
                se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
                print(f"  (a) {k}: default ({DEFAULT}) - ncnn2table aciq: mean {d.mean():+.4f} (standard error "
                      f"{se:.4f}); default >= peer on {int(np.sum(d >= 0))}/{len(d)} draws")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
