"""Run an export in its real runtime and compare it with deployq's simulation and with fp32.

Metrics: top-1 agreement (runtime vs simulation, runtime vs fp32), max/mean absolute output error in output
steps (one step = ``max|y_sim| / 127``, the step of an int8 symmetric grid over the simulated logits), and per
quantized layer the cosine similarity and SQNR (dB) of the runtime's layer output against the simulation's
(and SQNR against fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import read_manifest

Runner = Callable[[dict[str, Any], np.ndarray, list[str]], tuple[np.ndarray, dict[str, np.ndarray]]]
RUNNERS: dict[str, Runner] = {}


def runner(engine: str) -> Callable[[Runner], Runner]:
    def deco(fn: Runner) -> Runner:
        RUNNERS[engine] = fn
        return fn
    return deco


@dataclass(frozen=True)
class Thresholds:
    """CI gate: verification fails when one is breached."""

    min_agreement: float = 0.99
    max_error_steps: float = 1.0
    mean_error_steps: float = 0.1
    min_cosine: float = 0.99


# ------------------------------------------------------------------------------------------------- data

def load_data(spec: str, input_shape: tuple[int, ...], limit: int | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (float32 NCHW) and labels if known: ``builtin`` (MNIST-5k test), an ``.npz`` (arrays ``x`` or
    ``data``, optional ``y``) or a folder of images (resized, scaled to [0,1], MNIST-normalised)."""
    from .data import MNIST_MEAN, MNIST_STD, load_mnist5k

    if spec == "builtin":
        s = load_mnist5k("test")
        x, y = s.x, s.y
    elif spec.endswith(".npz"):
        if not Path(spec).exists():
            raise FileNotFoundError(f"--data {spec}: no such file")
        z = np.load(spec)
        key = next((k for k in ("x", "data") if k in z.files), None)
        if key is None:
            raise ValueError(f"--data {spec}: no array named 'x' or 'data' (has: {', '.join(z.files)})")
        x, y = z[key].astype(np.float32), (z["y"] if "y" in z.files else None)
    elif Path(spec).is_dir():
        from PIL import Image

        files = sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not files:
            raise ValueError(f"--data {spec}: the folder holds no .png/.jpg/.bmp images")
        _, c, h, w = input_shape
        imgs = []
        for p in files:
            im = Image.open(p).convert("RGB" if c == 3 else "L").resize((w, h))
            a = np.asarray(im, np.float32).reshape(h, w, c).transpose(2, 0, 1) / 255.0
            imgs.append((a - MNIST_MEAN) / MNIST_STD)
        x, y = np.stack(imgs).astype(np.float32), None
    else:
        raise ValueError(f"--data {spec!r}: use 'builtin', an .npz file or an image folder")
    if tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise ValueError(f"--data {spec}: images have shape {x.shape[1:]}, the export needs {input_shape[1:]}")
    if limit:
        x, y = x[:limit], (None if y is None else y[:limit])
    return np.ascontiguousarray(x), y


# ---------------------------------------------------------------------------------------------- runners

@runner("onnxruntime")
def run_onnxruntime(man: dict[str, Any], x: np.ndarray, layers: list[str], optimize: bool = False
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The QDQ model in onnxruntime (graph optimizations off unless ``optimize``), layer outputs included."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(man["paths"]["model"]))
    # Each layer output goes out through an Identity: a tensor that is only a graph output may be overwritten
    # by an in-place consumer (ORT runs Relu in place on the Conv output buffer).
    tensors = [f"{man['layers'][k]}.verify" for k in layers]
    m.graph.node.extend(onnx.helper.make_node("Identity", [man["layers"][k]], [t], name=t)
                        for k, t in zip(layers, tensors, strict=True))
    m.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = s.run([m.graph.output[0].name, *tensors], {man["input"]["name"]: x})
    return outs[0], dict(zip(layers, outs[1:], strict=True))


@runner("ncnn")
def run_ncnn(man: dict[str, Any], x: np.ndarray, layers: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The int8 ``.param``/``.bin`` (manifest files ``param``/``bin``) in the ncnn Python binding, one image at
    a time; layer outputs are the blobs named in the manifest's ``layers``."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_int8_inference = True
    net.opt.num_threads = 1
    net.opt.use_packing_layout = False  # ncnn's packed depthwise int8 path approximates 1/scale (ncnn-int8.md §6)
    for flag in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)
    if net.load_param(str(man["paths"]["param"])) != 0:
        raise ValueError(f"ncnn cannot read {man['paths']['param']}")
    if net.load_model(str(man["paths"]["bin"])) != 0:
        raise ValueError(f"ncnn cannot read {man['paths']['bin']}")
    out_blob = man.get("outputs", ["output"])[0]
    ys, per = [], {k: [] for k in layers}
    for img in x:
        ex = net.create_extractor()
        ex.input(man["input"]["name"], ncnn.Mat(np.ascontiguousarray(img)).clone())  # clone: see ncnn-int8.md §9
        ret, mat = ex.extract(out_blob)
        if ret != 0:
            raise ValueError(f"ncnn: cannot extract blob {out_blob!r} (ret {ret})")
        ys.append(np.array(mat).reshape(-1))
        for k in layers:
            _, m = ex.extract(man["layers"][k])
            per[k].append(np.array(m))
    return np.stack(ys), {k: np.stack(v) for k, v in per.items()}


@runner("mxnet")
def run_mxnet(man: dict[str, Any], x: np.ndarray, layers: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The exported grids on plain MXNet ops: the IR with weights replaced by ``codes * step`` and each quantized
    input quantized-dequantized (round half to even, zero point) — an independent check of the records."""
    import mxnet as mx

    from deployq.exporters.frontend import from_gluon
    from deployq.exporters.mxnet_lower import run
    from deployq.exporters.passes import optimize
    from deployq.exporters.qattach import attach_qnet
    from deployq.fakequant import fake_quantize

    from .api import load

    qnet = load(man["paths"]["qnet"])
    g = attach_qnet(optimize(from_gluon(qnet, tuple(man["input"]["shape"]))), qnet)
    grids: dict[str, Any] = {}
    for n in g.nodes:
        wq = n.attrs.get("wq")
        if wq is not None:
            shape = g.params[n.params["weight"]].shape
            g.params[n.params["weight"]] = (wq.codes * wq.step.reshape((-1,) + (1,) * (len(shape) - 1))
                                            ).astype(np.float32).reshape(shape)
        iq = n.attrs.get("iq")
        if iq is not None:
            prev = grids.setdefault(n.inputs[0], iq)
            if (prev.step, prev.zero_point) != (iq.step, iq.zero_point):
                raise ValueError(f"engine mxnet: tensor {n.inputs[0]} has two input grids")

    def hook(t: str, s: mx.sym.Symbol) -> mx.sym.Symbol:
        iq = grids.get(t)
        if iq is None:
            return s
        step = mx.sym.full((1,), iq.step)
        zp = mx.sym.full((1,), float(iq.zero_point)) if not iq.symmetric else None
        return fake_quantize(mx.sym, s, step, iq.qmin, iq.qmax, zp, "half_to_even", "step")

    from .layerwise import no_subgraph_fusion

    with no_subgraph_fusion():
        outs = run(g, x, outputs=[g.outputs[0], *(man["layers"][k] for k in layers)], hook=hook)
    return outs[g.outputs[0]], {k: outs[man["layers"][k]] for k in layers}


# ---------------------------------------------------------------------------------------------- metrics

def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if d == 0 else float(a @ b / d)


def _fp32_layers(qnet, x: np.ndarray, shape: tuple[int, ...], tensors: dict[str, str]) -> dict[str, np.ndarray]:
    """fp32 layer outputs with BN folded (as the exported layers compute them), from the IR."""
    from deployq.exporters.frontend import from_gluon
    from deployq.exporters.mxnet_lower import run
    from deployq.exporters.passes import optimize

    from .layerwise import no_subgraph_fusion

    g = optimize(from_gluon(qnet, shape))
    with no_subgraph_fusion():
        outs = run(g, x, outputs=sorted(set(tensors.values())))
    return {k: outs[t] for k, t in tensors.items()}


def verify(export_dir: str | Path, engine: str | None = None, data: str = "builtin", limit: int | None = 1000,
           thresholds: Thresholds = Thresholds(), layers: bool = True, **runner_kw: Any) -> dict[str, Any]:
    """Run the export and compare; returns a JSON-able report with ``passed`` and ``breaches``."""
    from .api import load
    from .layerwise import output_step, run_layers

    man = read_manifest(export_dir)
    engine = engine or man["engine"]
    if engine not in RUNNERS:
        raise ValueError(f"unknown engine {engine!r}; supported: {', '.join(RUNNERS)}")
    if "qnet" not in man["paths"]:
        raise ValueError(f"{export_dir}: the manifest names no saved quantized net (files.qnet)")
    shape = tuple(man["input"]["shape"])
    x, y = load_data(data, shape, limit)
    qnet = load(man["paths"]["qnet"])
    names = [k for k in man.get("layers", {})] if layers else []
    sim, sim_l = run_layers(qnet, x, names)
    f32, _ = run_layers(qnet, x, names, fp32=True)
    f32_l = _fp32_layers(qnet, x, shape, {k: man["layers"][k] for k in names})
    out, out_l = RUNNERS[engine](man, x, names, **runner_kw)
    out = out.reshape(sim.shape)
    step = output_step(qnet) or 1.0
    err = np.abs(out - sim) / step
    rep: dict[str, Any] = {
        "engine": engine, "export_dir": str(export_dir), "model": man.get("model"), "images": int(len(x)),
        "output_step": step,
        "agreement_sim": float((out.argmax(1) == sim.argmax(1)).mean()),
        "agreement_fp32": float((out.argmax(1) == f32.argmax(1)).mean()),
        "max_error_steps": float(err.max()), "mean_error_steps": float(err.mean()),
        "sqnr_fp32_db": sqnr_db(f32, out),
    }
    if y is not None:
        rep["accuracy"] = {"runtime": float((out.argmax(1) == y).mean()), "sim": float((sim.argmax(1) == y).mean()),
                           "fp32": float((f32.argmax(1) == y).mean())}
    rep["layers"] = [{"layer": k, "cosine_sim": cosine(sim_l[k], out_l[k].reshape(sim_l[k].shape)),
                      "sqnr_sim_db": sqnr_db(sim_l[k], out_l[k].reshape(sim_l[k].shape)),
                      "sqnr_fp32_db": sqnr_db(f32_l[k], out_l[k].reshape(f32_l[k].shape))}
                     for k in names if k in sim_l]
    t = thresholds
    breaches = []
    if rep["agreement_sim"] < t.min_agreement:
        breaches.append(f"top-1 agreement {rep['agreement_sim']:.4f} < {t.min_agreement}")
    if rep["max_error_steps"] > t.max_error_steps:
        breaches.append(f"max error {rep['max_error_steps']:.3f} steps > {t.max_error_steps}")
    if rep["mean_error_steps"] > t.mean_error_steps:
        breaches.append(f"mean error {rep['mean_error_steps']:.4f} steps > {t.mean_error_steps}")
    breaches += [f"layer {r['layer']}: cosine {r['cosine_sim']:.5f} < {t.min_cosine}"
                 for r in rep["layers"] if r["cosine_sim"] < t.min_cosine]
    rep["thresholds"] = asdict(t)
    rep["breaches"] = breaches
    rep["passed"] = not breaches
    return rep


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"{rep['engine']} vs simulation on {rep['images']} images ({rep['model']}):",
             f"  top-1 agreement {rep['agreement_sim']:.4f} (vs fp32 {rep['agreement_fp32']:.4f})",
             f"  output error: max {rep['max_error_steps']:.3f}, mean {rep['mean_error_steps']:.4f} steps "
             f"(step {rep['output_step']:.4g}: one input step on every input of the last layer)"]
    if "accuracy" in rep:
        a = rep["accuracy"]
        lines.append(f"  accuracy: runtime {a['runtime']:.4f}, sim {a['sim']:.4f}, fp32 {a['fp32']:.4f}")
    if rep["layers"]:
        w = max(len(r["layer"]) for r in rep["layers"])
        lines.append(f"  {'layer'.ljust(w)}  cosine    SQNR/sim dB  SQNR/fp32 dB")
        lines += [f"  {r['layer'].ljust(w)}  {r['cosine_sim']:.6f}  {r['sqnr_sim_db']:11.1f}  {r['sqnr_fp32_db']:12.1f}"
                  for r in rep["layers"]]
    lines.append("PASSED" if rep["passed"] else "FAILED: " + "; ".join(rep["breaches"]))
    return "\n".join(lines)
