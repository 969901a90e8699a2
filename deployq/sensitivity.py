"""Per-layer quantization sensitivity and automatic fp32 fallback for a target accuracy drop.

For each quantized layer: the logits' SQNR vs fp32 (and accuracy, with labels) with *only* that layer
quantized and with *only* that layer kept in fp32. Input ranges are min-max over calibration images, computed
once. ``fallback`` keeps the most sensitive layers in fp32, greedily, until the drop is met, and returns the
config list that does it (honoured by the exporters: no QDQ / no table line for those layers).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mxnet import gluon

from .api import quant_layers, quantize
from .errors import EXIT_VERIFY, UsageError
from .verify import sqnr_db

LAYER_TYPES = ["Conv2D", "Dense"]
NetFactory = Callable[[], gluon.HybridBlock]


def config_keeping_fp32(layers: list[str]) -> list[dict[str, Any]]:
    """Config list: every Conv2D/Dense quantized except ``layers`` (fp32)."""
    cfg: list[dict[str, Any]] = [{"op_types": LAYER_TYPES}]
    if layers:
        cfg.append({"op_names": sorted(layers), "exclude": True})
    return cfg


class _Evaluator:
    def __init__(self, make_net: NetFactory, x_calib: np.ndarray, x: np.ndarray, y: np.ndarray | None,
                 profile: str) -> None:
        from .layerwise import calibrate_minmax
        from .zoo import predict

        self.make_net, self.x, self.y, self.profile = make_net, x, y, profile
        probe = quantize(make_net(), profile=profile)
        self.ranges = calibrate_minmax(probe, x_calib)
        self.layers = list(quant_layers(probe))
        self.fp32 = predict(make_net(), x)

    def logits(self, config_list: list[dict[str, Any]]) -> np.ndarray:
        from .zoo import predict

        net = quantize(self.make_net(), config_list, profile=self.profile)
        for path, blk in quant_layers(net).items():
            blk.set_input_range(*self.ranges[path])
        return predict(net, self.x)

    def score(self, config_list: list[dict[str, Any]]) -> dict[str, float]:
        out = self.logits(config_list)
        s = {"sqnr_db": sqnr_db(self.fp32, out), "agreement": float((out.argmax(1) == self.fp32.argmax(1)).mean())}
        if self.y is not None:
            s["accuracy"] = float((out.argmax(1) == self.y).mean())
        return s

    def fp32_accuracy(self) -> float:
        ref = self.y if self.y is not None else self.fp32.argmax(1)
        return float((self.fp32.argmax(1) == ref).mean())

    def metric(self, s: dict[str, float]) -> float:
        return s["accuracy"] if self.y is not None else s["agreement"]


class UnknownLayerError(UsageError, ValueError):
    """A --layers name that is not a quantized layer of the model (exit 2)."""


def analyse(make_net: NetFactory, x_calib: np.ndarray, x: np.ndarray, y: np.ndarray | None = None,
            profile: str = "onnx", layers: list[str] | None = None, target_drop: float | None = None
            ) -> dict[str, Any]:
    """Rank the layers by sensitivity; with ``target_drop``, also pick the fp32 fallback set."""
    ev = _Evaluator(make_net, x_calib, x, y, profile)
    layers = layers or ev.layers
    unknown = [k for k in layers if k not in ev.layers]
    if unknown:
        raise UnknownLayerError(f"unknown layer(s) {unknown}; quantized layers: {', '.join(ev.layers)}",
                                where="--layers")
    base = ev.score(config_keeping_fp32([]))
    rows = []
    for k in layers:
        only_q = ev.score([{"op_names": [k]}])
        only_f = ev.score(config_keeping_fp32([k]))
        rows.append({"layer": k, "only_quantized": only_q, "only_fp32": only_f,
                     "sqnr_gain_db": only_f["sqnr_db"] - base["sqnr_db"]})
    rows.sort(key=lambda r: r["only_quantized"]["sqnr_db"])  # most sensitive first
    rep: dict[str, Any] = {"profile": profile, "images": int(len(x)), "metric": "accuracy" if y is not None
                           else "top-1 agreement with fp32", "fp32": ev.fp32_accuracy(), "all_quantized": base,
                           "layers": rows}
    if target_drop is not None:
        rep["fallback"] = fallback(ev, [r["layer"] for r in rows], target_drop)
    return rep


def fallback(ev: _Evaluator, ranked: list[str], target_drop: float) -> dict[str, Any]:
    """Keep layers in fp32 in ``ranked`` order until ``fp32 metric - metric <= target_drop``."""
    ref = ev.fp32_accuracy()
    kept: list[str] = []
    s = ev.score(config_keeping_fp32(kept))
    trail = [{"fp32_layers": 0, **s}]
    for k in ranked:
        if ref - ev.metric(s) <= target_drop:
            break
        kept.append(k)
        s = ev.score(config_keeping_fp32(kept))
        trail.append({"fp32_layers": len(kept), **s})
    met = ref - ev.metric(s) <= target_drop
    return {"target_drop": target_drop, "met": met, "drop": ref - ev.metric(s), "fp32_layers": kept,
            "config_list": config_keeping_fp32(kept), "trail": trail}


def write_report(rep: dict[str, Any], out_dir: str | os.PathLike, title: str = "model") -> dict[str, Path]:
    """``sensitivity.json``, ``sensitivity.png`` (bar plot), ``sensitivity.html`` and, with a fallback,
    ``config_list.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import jinja2
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "sensitivity.json", "png": out / "sensitivity.png", "html": out / "sensitivity.html"}
    _write(files["json"], json.dumps(rep, indent=2, sort_keys=True, default=float) + "\n")
    rows = rep["layers"]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 1.5))
    ax.barh([r["layer"] for r in rows][::-1], [r["only_quantized"]["sqnr_db"] for r in rows][::-1], color="#c44")
    ax.set_xlabel("logits SQNR vs fp32 (dB), only this layer quantized (lower = more sensitive)")
    ax.set_title(f"{title}: per-layer sensitivity ({rep['profile']})")
    fig.tight_layout()
    tmp = files["png"].with_name(".sensitivity.png.tmp")
    fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, files["png"])
    from importlib.resources import files as package_files

    loader = jinja2.FileSystemLoader(str(package_files("deployq.templates")))
    env = jinja2.Environment(loader=loader, autoescape=True)
    html = env.get_template("sensitivity.html.j2").render(rep=rep, title=title, png=files["png"].name)
    _write(files["html"], html)
    if "fallback" in rep:
        files["config"] = out / "config_list.json"
        _write(files["config"], json.dumps(rep["fallback"]["config_list"], indent=2) + "\n")
    return files


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("sensitivity", help="per-layer sensitivity; fp32 fallback for a target drop",
                              description="Rank quantized layers by sensitivity (only-this-layer quantized / "
                                          "only-this-layer fp32) and write JSON, PNG and HTML reports.")
    from . import preprocess
    from .images import add_data_arguments
    from .modelargs import add_model_arguments

    add_model_arguments(p, qnet=False)
    add_data_arguments(p, help_text="evaluation images: a folder (class subfolders: accuracy; else top-1 agreement "
                                    "with fp32) or an .npz; default for the built-in models: MNIST-5k test")
    p.add_argument("--calib-data", default=None, help="calibration images (default: --data; MNIST-5k train for the "
                                                      "built-in models)")
    preprocess.add_arguments(p)
    p.add_argument("--profile", default="onnx")
    p.add_argument("--images", type=int, default=300, help="at most this many evaluation images")
    p.add_argument("--calib-images", type=int, default=300, help="at most this many calibration images")
    p.add_argument("--layers", nargs="*", default=None, help="only these layers (default: all)")
    p.add_argument("--target-drop", type=float, default=None,
                   help="keep the fewest layers in fp32 so that the accuracy drop is at most this (0.01 = 1%%)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.set_defaults(func=run_cli)


def _balanced(y: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` images spread evenly over the classes (deterministic; all images if ``n`` >= len)."""
    from .data import class_balanced_subset

    if n >= len(y):
        return np.arange(len(y))
    classes = len(np.unique(y))
    return class_balanced_subset(y, -(-n // classes))[:n]


def _images(spec: str | None, m: Any, split: str, n: int, skip_bad: bool) -> tuple[np.ndarray, np.ndarray | None]:
    from .errors import UsageError
    from .images import open_data

    if spec is None:
        if m.kind != "builtin":
            raise UsageError(f"no --data: {m.name} is scored on your images", fix="pass --data DIR")
        spec = "builtin"
    d = open_data(spec, m.preprocess, split=split, skip_bad=skip_bad, quiet=True)
    # MNIST-5k is sorted by class: take class-balanced subsets, not the first N images (one to three digits)
    idx = _balanced(d.y, n) if d.y is not None else np.arange(min(n, len(d.x)))
    return np.asarray(d.x[idx]), (None if d.y is None else d.y[idx])


def run_cli(args: argparse.Namespace) -> int:
    from .modelargs import load_model

    m = load_model(args, quiet=True)
    x, y = _images(args.data, m, "test", args.images, args.skip_bad_images)
    xc, _ = _images(args.calib_data or args.data, m, "train", args.calib_images, args.skip_bad_images)
    first = [m.net]

    def make_net():  # a fresh fp32 net per configuration (quantize swaps layers in place)
        return first.pop() if first else load_model(args, quiet=True).net

    rep = analyse(make_net, xc, x, y, args.profile, args.layers, args.target_drop)
    files = write_report(rep, args.out, m.name)
    for r in rep["layers"][:10]:
        print(f"{r['layer']:<28} only-quantized SQNR {r['only_quantized']['sqnr_db']:6.1f} dB  "
              f"acc {r['only_quantized'].get('accuracy', float('nan')):.4f}  "
              f"only-fp32 acc {r['only_fp32'].get('accuracy', float('nan')):.4f}")
    if "fallback" in rep:
        fb = rep["fallback"]
        print(f"fallback: {len(fb['fp32_layers'])} layer(s) in fp32 {fb['fp32_layers']}: drop {fb['drop']:.4f} "
              f"({'met' if fb['met'] else 'NOT met'} target {fb['target_drop']})")
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0 if rep.get("fallback", {}).get("met", True) else EXIT_VERIFY  # target missed: exit 4
