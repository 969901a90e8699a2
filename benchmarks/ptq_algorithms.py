"""Post-training quantization algorithms on MNIST-5k (issue 17): MinMax / MSE / KL / ACIQ / EQ calibration,
+CLE+bias correction, AdaRound, AdaRound + QDrop, on

(a) ncnn 8-bit, exported and run in ncnn's runtime (PyPI ``ncnn``);
(b) ncnn with 6-bit weights on 3x3 stride-1 convs (``winograd_3x3: six_bit``), in ncnn's runtime;
(c) the ``custom`` profile at W4A8 and W4A4 (deployq's simulation), unsigned inputs on the 4-bit layers; the
    first conv and the last Dense stay W8A8 (as MQBench's benchmark keeps them).

The fp32 models are deployq's built-in trainings (``deployq.zoo.get_trained``: SGD with cosine lr to the end of
its schedule). Every row uses the same calibration images (class-balanced from MNIST-5k train, seed 0) and the
same test images (class-balanced from MNIST-5k test). CLE+BC and the AdaRound rows calibrate with
``--base-method`` (mse); BRECQ / QDrop (block): ``calib/ptq/brecq.py``, iterations per block.

Peer rows (ncnn8 / ncnn6, ``--no-peers`` to leave them out): ncnn's own ``ncnn2table`` (aciq, kl, eq) on the same
fp32 net and calibration tensors, ``ncnn2int8``, ncnn's runtime (``ncnn2table_peer.py``; skipped with the reason
printed when ``NCNN_BIN`` does not hold the tools). ncnn2table always gives 3x3 stride-1 convs 6-bit weights, so its
rows are the same models under ncnn8 and ncnn6. Target (a) compares deployq's default calibration
(``deployq.calib.DEFAULT_METHOD``, mse: what ``deployq calibrate`` does) with the best ncnn2table method on this
one draw; ``calib_draws.py`` repeats it over 8 draws.

Wall time at resnet18_v1 224x224: ``benchmarks/ptq_time.py``.

Usage: ``python benchmarks/ptq_algorithms.py [--models resnet20 ...] [--iters 200] [--calib 128] [--test 1000]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import ncnn2table_peer
import numpy as np
from deployq.calib import DEFAULT_METHOD
from deployq.calib.ptq import AdaRoundConfig
from deployq.calib.ptq.pipeline import build

try:
    from deployq.calib.ptq.brecq import BrecqConfig
except ImportError:  # older trees: no block reconstruction
    BrecqConfig = None

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


def has_six_bit_layers(name: str) -> bool:
    """Whether ncnn's ``winograd_3x3: six_bit`` changes a layer of ``name`` (a 3x3 stride-1 dense conv)."""
    prof, _ = setting(name, "ncnn6")
    probe = deployq.quantize(get_trained(name, verbose=False), profile=prof)
    return any(b.layer_config.weight is not None and b.layer_config.weight.bits == 6
               for b in deployq.quant_layers(probe).values())


def score(net, s: str, x: np.ndarray, y: np.ndarray, name: str) -> dict:
    logits = predict(net, x)
    sim = float(np.mean(logits.argmax(1) == y))
    if not s.startswith("ncnn"):
        return {"accuracy": sim, "simulated": sim, **onnx_int4(net, x, y, logits, name)}
    from deployq.exporters.ncnn.runtime import export_and_run

    with tempfile.TemporaryDirectory() as d:
        r = export_and_run(net, d, x, y, name)
    return {"accuracy": r["accuracy"], "simulated": sim, "agreement": r["agreement"]}


def onnx_int4(net, x: np.ndarray, y: np.ndarray, sim_logits: np.ndarray, name: str) -> dict:
    """The net's ONNX export (INT4 weight initializers, UINT4 4-bit inputs, opset 21) in onnxruntime, graph
    optimizations off (as ``deployq verify``) and on (``onnx_opt_*``: onnxruntime then quantizes the float biases
    to int32 on input_step * weight_step itself): top-1, top-1 agreement with the simulation, max logit error."""
    import onnxruntime as ort
    from deployq.exporters.onnx.export import export_qnet

    res = {}
    with tempfile.TemporaryDirectory() as d:
        files = export_qnet(net, d, name, fp32=False)
        for key, off in (("onnx", True), ("onnx_opt", False)):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            if off:
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(str(files["model"]), so, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0].name
            out = np.concatenate([sess.run(None, {inp: x[i:i + 100]})[0] for i in range(0, len(x), 100)])
            res.update({f"{key}_accuracy": float(np.mean(out.argmax(1) == y)),
                        f"{key}_agreement": float(np.mean(out.argmax(1) == sim_logits.argmax(1))),
                        f"{key}_max_logit_error": float(np.abs(out - sim_logits).max())})
    return res


def rows(name: str, s: str, xc: np.ndarray, x: np.ndarray, y: np.ndarray, args) -> dict[str, dict]:
    prof, cfg = setting(name, s)
    ada = AdaRoundConfig(iters=args.iters, batch_size=32)
    plan = [(m, dict(method=m)) for m in METHODS] + [
        ("+CLE+BC", dict(method=args.base_method, cle=True, bc=True)),
        ("AdaRound", dict(method=args.base_method, ada=ada)),
        ("QDrop (layer)", dict(method=args.base_method,
                               ada=AdaRoundConfig(iters=args.iters, batch_size=32, qdrop=0.5)))]
    if BrecqConfig is not None:  # block reconstruction (calib/ptq/brecq.py), iterations per block
        plan += [("BRECQ", dict(method=args.base_method, brecq=BrecqConfig(iters=args.iters, batch_size=32,
                                                                             qdrop=0.0))),
                 ("QDrop (block)", dict(method=args.base_method, brecq=BrecqConfig(iters=args.iters,
                                                                                     batch_size=32, qdrop=0.5)))]
    out = {}
    for label, kw in plan:
        if args.rows and label not in args.rows:
            continue
        t = time.perf_counter()
        net, _ = build(get_trained(name, verbose=False), xc, prof, cfg, **kw)
        r = score(net, s, x, y, name)
        r["seconds"] = time.perf_counter() - t
        out[label] = r
        ox = ("onnx int4 {onnx_accuracy:.4f} agreement {onnx_agreement:.4f} (optimized: {onnx_opt_agreement:.4f})"
              .format(**r) if "onnx_accuracy" in r else "")
        print(f"  {name:<14} {s:<6} {label:<13} {r['accuracy']:.4f}  (sim {r['simulated']:.4f}"
              f"{', ncnn agreement {:.4f}'.format(r['agreement']) if 'agreement' in r else ''}{ox and ', ' + ox}) "
              f"{r['seconds']:.0f}s",
              file=sys.stderr, flush=True)
    if BrecqConfig is None:
        out["BRECQ"] = {"accuracy": None, "error": "not in this deployq (calib/ptq/brecq.py)"}
    if s.startswith("ncnn") and args.peers and (not args.rows or "peers" in args.rows):
        out.update(peer_rows(name, xc, x, y))
    return out


_PEERS: dict[str, dict[str, dict]] = {}


def peer_rows(name: str, xc: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, dict]:
    """ncnn2table's rows of ``name`` (computed once per model: the same models under ncnn8 and ncnn6)."""
    if name not in _PEERS:
        why = ncnn2table_peer.tools_missing()
        if why:
            print(f"  ncnn2table peer rows skipped: {why}", file=sys.stderr, flush=True)
            _PEERS[name] = {}
        else:
            _PEERS[name] = ncnn2table_peer.ncnn2table_rows(name, xc, x, y)
            for label, r in _PEERS[name].items():
                acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
                print(f"  {name:<14} peer   {label:<16} {acc}  {r.get('error', '')} {r['seconds']:.0f}s",
                      file=sys.stderr, flush=True)
    return _PEERS[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["mobilenet0.25", "resnet20"])
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--iters", type=int, default=200, help="AdaRound iterations per layer")
    ap.add_argument("--calib", type=int, default=128, help="calibration images")
    ap.add_argument("--test", type=int, default=1000, help="test images")
    ap.add_argument("--base-method", default="mse")
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="leave out the ncnn2table rows")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--rows", nargs="*", default=None,
                    help="only these rows (e.g. +CLE+BC; 'peers': the ncnn2table rows)")
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
        res["models"][name] = {"fp32": fp, "iters": args.iters, "settings": {}}
        print(f"{name}: fp32 {fp:.4f}", file=sys.stderr, flush=True)
        for s in args.settings:
            if s == "ncnn6" and "ncnn8" in res["models"][name]["settings"] and not has_six_bit_layers(name):
                print(f"  {name}: no 3x3 stride-1 dense conv, ncnn6 = ncnn8 (the same model)", file=sys.stderr)
                res["models"][name]["settings"][s] = res["models"][name]["settings"]["ncnn8"]
                continue
            res["models"][name]["settings"][s] = rows(name, s, xc, x, y, args)
    for path in args.update or []:
        with open(path) as f:
            old = json.load(f)
        for name, m in res["models"].items():
            for s, r in m["settings"].items():
                old["models"].setdefault(name, m)["settings"].setdefault(s, {}).update(r)
        old.update({k: v for k, v in res.items() if k not in ("models", "iters")})
        res = old
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def print_table(res: dict) -> None:
    for name, m in res["models"].items():
        print(f"\n{name} (fp32 {m['fp32']:.4f}; {res['test_images']} MNIST-5k test images, {res['calib_images']} "
              f"calibration images, AdaRound/BRECQ {m.get('iters', res['iters'])} iterations per layer/block)")
        cols = [(s, "accuracy") for s in m["settings"]]
        cols += [(s, "onnx_accuracy") for s in m["settings"]
                 if any("onnx_accuracy" in r for r in m["settings"][s].values())]
        settings = list(m["settings"])
        print(f"{'method':<17}" + "".join(f"{s + (' ORT' if k != 'accuracy' else ''):>15}" for s, k in cols)
              + "   (accuracy (change vs fp32, points))")
        labels = list(dict.fromkeys(k for rs in m["settings"].values() for k in rs))
        for label in labels:
            cells = []
            for s, key in cols:
                a = m["settings"][s].get(label, {}).get(key)
                cells.append(f"{'n/a':>15}" if a is None else f"{a:.4f} ({100 * (a - m['fp32']):+.1f})".rjust(15))
            print(f"{label:<17}" + "".join(cells))
        for label in labels:
            errs = {m["settings"][s].get(label, {}).get("error") for s in settings} - {None}
            for e in errs:
                print(f"  {label}: {e}")
        for s in settings:
            rs = m["settings"][s]
            own = {k: v for k, v in rs.items() if v.get("accuracy") is not None and not k.startswith("ncnn")}
            if not own:
                continue
            best = max((v["accuracy"], k) for k, v in own.items())
            mm = rs.get("minmax", {}).get("accuracy")
            ratio = f"; minmax {mm:.4f}; best/minmax {best[0] / mm:.3f}" if mm else ""
            print(f"  {s}: best deployq {best[1]} {best[0]:.4f}{ratio}")
        for s in settings:
            for key, what in (("agreement", "ncnn runtime"), ("onnx_agreement", "ORT, optimizations off"),
                              ("onnx_opt_agreement", "ORT, default optimizations")):
                ag = [v[key] for v in m["settings"][s].values() if key in v]
                if ag:
                    print(f"  {s}: top-1 agreement with the simulation ({what}): min {min(ag):.4f} over {len(ag)} rows")
        for line in targets(m):
            print(f"  {line}")


def targets(m: dict) -> list[str]:
    """The issue's targets (a)-(c) on one model's rows, met or not, with the numbers."""
    fp, st, lines = m["fp32"], m["settings"], []

    def acc(s: str, label: str) -> float | None:
        return st.get(s, {}).get(label, {}).get("accuracy")

    def best(s: str) -> tuple[float, str] | None:
        own = [(v["accuracy"], k) for k, v in st.get(s, {}).items()
               if v.get("accuracy") is not None and not k.startswith("ncnn")]
        return max(own) if own else None

    peers = [(v["accuracy"], k) for k, v in st.get("ncnn8", st.get("ncnn6", {})).items()
             if k.startswith("ncnn2table") and v.get("accuracy") is not None]
    if peers and acc("ncnn8", DEFAULT_METHOD) is not None:
        p, d = max(peers), acc("ncnn8", DEFAULT_METHOD)
        d6 = acc("ncnn6", DEFAULT_METHOD)
        lines.append(f"(a) deployq default ({DEFAULT_METHOD}) ncnn8 {d:.4f} vs best ncnn2table ({p[1]}) {p[0]:.4f}: "
                     f"{d - p[0]:+.4f} -> {'met' if d >= p[0] else 'NOT met'} on this draw (over 8 draws: "
                     "benchmarks/calib_draws.py)" + (f"; ncnn6 default {d6:.4f}" if d6 is not None else ""))
    if best("ncnn6"):
        b = best("ncnn6")
        lines.append(f"(b) ncnn6 best deployq ({b[1]}) {b[0]:.4f}, fp32 {fp:.4f}: {100 * (b[0] - fp):+.1f} pt -> "
                     f"{'met' if fp - b[0] <= 0.003 + 1e-9 else 'NOT met'} (within 0.3 pt)")
    for s, tol in (("w4a8", 0.01), ("w4a4", 0.03)):
        if best(s):
            b, mm = best(s), acc(s, "minmax")
            lines.append(f"(c) {s} best ({b[1]}) {b[0]:.4f}: {100 * (b[0] - fp):+.1f} pt -> "
                         f"{'met' if fp - b[0] <= tol + 1e-9 else 'NOT met'} (within {100 * tol:.0f} pt)"
                         + (f"; minmax {mm:.4f} ({100 * (mm - fp):+.1f} pt)" if mm is not None else ""))
    return lines


if __name__ == "__main__":
    main()
