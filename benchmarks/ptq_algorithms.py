"""Post-training quantization algorithms on MNIST-5k (issue 17): MinMax / MSE / KL / ACIQ / EQ calibration,
+CLE+bias correction, AdaRound, AdaRound + QDrop, on

(a) ncnn 8-bit, exported and run in ncnn's runtime (PyPI ``ncnn``);
(b) ncnn with 6-bit weights on 3x3 stride-1 convs (``winograd_3x3: six_bit``), in ncnn's runtime;
(c) the ``custom`` profile at W4A8 and W4A4 (deployq's simulation), unsigned inputs on the 4-bit layers; the
    first conv and the last Dense stay W8A8 (as MQBench's benchmark keeps them).

The fp32 models are deployq's built-in trainings (``deployq.zoo.get_trained``: SGD with cosine lr to the end of
its schedule). Every row uses the same calibration images (class-balanced from MNIST-5k train, seed 0) and the
same test images (class-balanced from MNIST-5k test). CLE+BC and the AdaRound rows calibrate with
``--base-method`` (mse). BRECQ (block reconstruction) is not implemented (row printed as n/a).

``--resnet18-timing``: AdaRound's cost on resnet18_v1 at 224x224 (random weights; cost does not depend on
them): a reduced run (few iterations on every layer), extrapolated to 512 calibration images and
``--iters`` iterations per layer.

Usage: ``python benchmarks/ptq_algorithms.py [--models resnet20 ...] [--iters 200] [--calib 128] [--test 1000]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
from deployq.calib.ptq import AdaRoundConfig
from deployq.calib.ptq.pipeline import build

import deployq
from deployq.data import class_balanced_subset, load_mnist5k
from deployq.zoo import get_trained, predict

METHODS = ("minmax", "mse", "kl", "aciq", "eq")
SETTINGS = ("ncnn8", "ncnn6", "w4a8", "w4a4")
LAYER_TYPES = ["Conv2D", "Dense"]


def low_bit_config(name: str, a_bits: int) -> list[dict]:
    """W4A<a_bits> on every layer but the first and the last (W8A8)."""
    probe = deployq.quantize(get_trained(name, verbose=False), profile="custom")
    layers = list(deployq.quant_layers(probe))
    return [{"op_types": LAYER_TYPES, "quant_bits": {"weight": 4, "input": a_bits},
             "quant_dtype": {"weight": "int", "input": "uint"}},
            {"op_names": [layers[0], layers[-1]], "quant_bits": 8}]


def setting(name: str, s: str) -> tuple[object, list[dict] | None]:
    if s == "ncnn8":
        return "ncnn", None
    if s == "ncnn6":
        return deployq.load_profile("ncnn").with_options(winograd_3x3="six_bit"), None
    return "custom", low_bit_config(name, 8 if s == "w4a8" else 4)


def score(net, s: str, x: np.ndarray, y: np.ndarray, name: str) -> dict:
    sim = float(np.mean(predict(net, x).argmax(1) == y))
    if not s.startswith("ncnn"):
        return {"accuracy": sim, "simulated": sim}
    from deployq.exporters.ncnn.runtime import export_and_run

    with tempfile.TemporaryDirectory() as d:
        r = export_and_run(net, d, x, y, name)
    return {"accuracy": r["accuracy"], "simulated": sim, "agreement": r["agreement"]}


def rows(name: str, s: str, xc: np.ndarray, x: np.ndarray, y: np.ndarray, args) -> dict[str, dict]:
    prof, cfg = setting(name, s)
    ada = AdaRoundConfig(iters=args.iters, batch_size=32)
    plan = [(m, dict(method=m)) for m in METHODS] + [
        ("+CLE+BC", dict(method=args.base_method, cle=True, bc=True)),
        ("AdaRound", dict(method=args.base_method, ada=ada)),
        ("QDrop", dict(method=args.base_method, ada=AdaRoundConfig(iters=args.iters, batch_size=32, qdrop=0.5)))]
    out = {}
    for label, kw in plan:
        if args.rows and label not in args.rows:
            continue
        t = time.perf_counter()
        net, _ = build(get_trained(name, verbose=False), xc, prof, cfg, **kw)
        r = score(net, s, x, y, name)
        r["seconds"] = time.perf_counter() - t
        out[label] = r
        print(f"  {name:<14} {s:<6} {label:<9} {r['accuracy']:.4f}  (sim {r['simulated']:.4f}"
              f"{', ncnn agreement {:.4f}'.format(r['agreement']) if 'agreement' in r else ''}) "
              f"{r['seconds']:.0f}s",
              file=sys.stderr, flush=True)
    out["BRECQ"] = {"accuracy": None}
    return out


def resnet18_timing(iters: int, images: int = 512, probe_images: int = 32, probe_iters: int = 4) -> dict:
    """AdaRound on resnet18_v1 224x224: per layer, the seconds per iteration (batch 32) and the per-layer
    overhead (fp32 tensors, simulated input) on ``probe_images``; extrapolated to ``images`` and ``iters``."""
    import mxnet as mx
    from deployq.calib.ptq import adaround

    from deployq.layerwise import calibrate_minmax
    from deployq.zoo import get_model

    net = get_model("resnet18_v1", classes=1000)
    net.initialize(mx.init.Xavier())
    x = np.random.default_rng(0).normal(size=(probe_images, 3, 224, 224)).astype(np.float32)
    net(mx.nd.array(x[:1]))
    deployq.quantize(net, profile="ncnn")
    calibrate_minmax(net, x)
    r1 = adaround(net, x, AdaRoundConfig(iters=1, batch_size=32))
    r2 = adaround(net, x, AdaRoundConfig(iters=1 + probe_iters, batch_size=32))
    per_iter = sum(r2["layers"][k]["seconds"] - r1["layers"][k]["seconds"] for k in r1["layers"]) / probe_iters
    overhead = r1["seconds"] - sum(v["seconds"] for v in r1["layers"].values())
    est = per_iter * iters + overhead * images / probe_images
    return {"layers": len(r1["layers"]), "seconds_per_iteration_all_layers": per_iter,
            "overhead_seconds_at_probe": overhead, "probe_images": probe_images, "images": images,
            "iters": iters, "estimated_seconds": est}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mobilenet0.25", "resnet20"])
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--iters", type=int, default=200, help="AdaRound iterations per layer")
    ap.add_argument("--calib", type=int, default=128, help="calibration images")
    ap.add_argument("--test", type=int, default=1000, help="test images")
    ap.add_argument("--base-method", default="mse")
    ap.add_argument("--resnet18-timing", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--rows", nargs="*", default=None, help="only these rows (e.g. +CLE+BC)")
    ap.add_argument("--update", nargs="*", default=None,
                    help="earlier --json files: the rows computed now replace theirs; the merged table is printed")
    args = ap.parse_args()
    tr, te = load_mnist5k("train"), load_mnist5k("test")
    xc = tr.x[class_balanced_subset(tr.y, -(-args.calib // 10), 0)[:args.calib]]
    it = class_balanced_subset(te.y, -(-args.test // 10), 0)[:args.test]
    x, y = te.x[it], te.y[it]
    res: dict = {"calib_images": len(xc), "test_images": len(x), "iters": args.iters, "models": {}}
    for name in args.models:
        fp = float(np.mean(predict(get_trained(name, verbose=False), x).argmax(1) == y))
        res["models"][name] = {"fp32": fp, "settings": {}}
        print(f"{name}: fp32 {fp:.4f}", file=sys.stderr, flush=True)
        for s in args.settings:
            res["models"][name]["settings"][s] = rows(name, s, xc, x, y, args)
    if args.resnet18_timing:
        res["resnet18_timing"] = resnet18_timing(args.iters)
    for path in args.update or []:
        with open(path) as f:
            old = json.load(f)
        for name, m in res["models"].items():
            for s, r in m["settings"].items():
                old["models"].setdefault(name, m)["settings"].setdefault(s, {}).update(r)
        old.update({k: v for k, v in res.items() if k != "models"})
        res = old
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def print_table(res: dict) -> None:
    for name, m in res["models"].items():
        print(f"\n{name} (fp32 {m['fp32']:.4f}; {res['test_images']} MNIST-5k test images, {res['calib_images']} "
              f"calibration images, AdaRound {res['iters']} iterations/layer)")
        settings = list(m["settings"])
        print(f"{'method':<10}" + "".join(f"{s:>15}" for s in settings) + "   (accuracy (change vs fp32, points))")
        labels = list(dict.fromkeys(k for rs in m["settings"].values() for k in rs))
        for label in labels:
            cells = []
            for s in settings:
                a = m["settings"][s].get(label, {}).get("accuracy")
                cells.append(f"{'n/a':>15}" if a is None else f"{a:.4f} ({100 * (a - m['fp32']):+.1f})".rjust(15))
            print(f"{label:<10}" + "".join(cells))
        for s in settings:
            rs = m["settings"][s]
            best = max((v["accuracy"], k) for k, v in rs.items() if v["accuracy"] is not None)
            if "minmax" not in rs:
                continue
            mm = rs["minmax"]["accuracy"]
            print(f"  {s}: best {best[1]} {best[0]:.4f}; minmax {mm:.4f}; best/minmax {best[0] / mm:.3f}")
    if "resnet18_timing" in res:
        t = res["resnet18_timing"]
        print(f"\nresnet18_v1 224x224 AdaRound, {t['images']} images x {t['iters']} iterations/layer: estimated "
              f"{t['estimated_seconds'] / 60:.1f} min ({t['layers']} layers, "
              f"{t['seconds_per_iteration_all_layers']:.2f} s per iteration over all layers, measured on "
              f"{t['probe_images']} images)")


if __name__ == "__main__":
    main()
