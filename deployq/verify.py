"""Run an export in its real runtime and compare it with deployq's simulation and with fp32.

Metrics: top-1 agreement (runtime vs simulation, runtime vs fp32), max/mean absolute output error in output
steps (:func:`deployq.layerwise.output_step`: one input step on every input of the last quantized layer), and
per quantized layer the cosine similarity and SQNR (dB) of the runtime's layer output against the simulation's
(and SQNR against fp32). ncnn's blobs hold the fused layer's output (after the activation, int8 codes under
requantize fusion): see :func:`verify` for how they are compared exactly.

The simulation comes from the saved quantized net (``files.qnet``) or, for an export from MXNet json/params
files, is rebuilt from those files and the scale file (:func:`reference`).
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

def export_preprocess(man: dict[str, Any]) -> Any:
    """The preprocessing an export states (its manifest's ``preprocess`` block); exports made before it: MNIST's."""
    from .preprocess import Preprocess, mnist

    shape = tuple(man["input"]["shape"])
    if man.get("preprocess"):
        return Preprocess.from_dict(man["preprocess"], "deployq-export.json: preprocess").with_shape(shape)
    return mnist(shape)


def load_data(spec: str | None, input_shape: tuple[int, ...], limit: int | None = None, preprocess: Any = None,
              skip_bad: bool = False, quiet: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (float32 NCHW) and labels if known: ``builtin`` (MNIST-5k test), an ``.npz`` (arrays ``x`` or
    ``data``, optional ``y``) or an image folder (``deployq.images``), preprocessed as ``preprocess`` says
    (default: MNIST's normalisation)."""
    from .errors import UsageError
    from .images import open_data
    from .preprocess import mnist

    if spec is None:
        raise UsageError("no --data: pass the images to verify on", fix="--data DIR, --data FILE.npz or --data builtin")
    pre = (preprocess or mnist(input_shape)).with_shape(tuple(input_shape))
    d = open_data(spec, pre, split="test", limit=limit, skip_bad=skip_bad, quiet=quiet)
    return np.ascontiguousarray(d.x), d.y


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


#: manifest ``files`` each runner needs (``mxnet`` re-runs the records of the saved quantized net)
REQUIRED_FILES = {"onnxruntime": ("model",), "ncnn": ("param", "bin"), "mxnet": ("qnet",),
                  "tengine": ("symbol", "params", "table", "scales")}


def check_engine(man: dict[str, Any], engine: str, where: str | Path) -> None:
    """A clear error when the export has no model for ``engine`` (an ONNX export run with --engine ncnn)."""
    missing = [k for k in REQUIRED_FILES.get(engine, ()) if k not in man["paths"]]
    if not missing:
        return
    written = man.get("engine")
    if engine == written and man.get("int8_refused"):
        raise ValueError(f"{where}: this export has no int8 model: {man['int8_refused']} (its fp32 model "
                         f"{man['paths'].get('fp32_param', '')} is written)")
    if engine == "mxnet":
        raise ValueError(f"{where}: --engine mxnet re-runs the records of the saved quantized net, and this export "
                         f"has none (files.qnet; an export from MXNet json/params files): its simulation is already "
                         f"computed on MXNet ops from the files; use --engine {written}")
    hint = f"; use --engine {written}" if written and written != engine else ""
    raise ValueError(f"{where}: this export was written for {written}; its manifest has no {engine} model "
                     f"(files: {', '.join(missing)}){hint}")


def tengine_runtime(kernels: str = "x86") -> tuple[Any, str]:
    """(Tengine's tools, what runs) when ``TENGINE_CONVERT_TOOL``/``TENGINE_QUANT_TOOL``/``TENGINE_LIB`` name
    them (``../shared/engines/build.sh`` prints them), else (None, deployq's NumPy model and why). ``kernels``
    ``arm64``: ((tools, qemu + aarch64 runner), what runs) when ``TENGINE_ARM_RUNNER`` and qemu-aarch64 are
    found too (``tests/engines/arm/build.sh``), else (None, deployq's NumPy model of the aarch64 kernels)."""
    from deployq.exporters.tengine.runtime import find_tools

    tools, why = find_tools()
    if kernels == "arm64":
        from deployq.exporters.tengine.arm64 import find_arm_runner

        cmd, why_arm = find_arm_runner()
        if tools is not None and cmd is not None:
            return (tools, cmd), (f"Tengine's aarch64 runtime under qemu-user ({cmd[-1]}; int8 tmfile from the x86 "
                                  "convert_tool + quant_tool_int8 -f with the export's table)")
        return None, ("deployq's NumPy model of Tengine's aarch64 int8 kernels (exporters/tengine/arm64.py), the "
                      "simulation itself: only the export files are checked (the emulated aarch64 runtime not found: "
                      f"{why_arm or why})")
    if tools is not None:
        return tools, (f"Tengine's runtime ({tools.lib}; int8 tmfile from convert_tool + quant_tool_int8 -f with "
                       "the export's table)")
    return None, f"deployq's NumPy model of Tengine's x86 int8 kernels (Tengine's tools not found: {why})"


@runner("tengine")
def run_tengine(man: dict[str, Any], x: np.ndarray, layers: list[str], kernels: str | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The export in Tengine's own runtime when its tools are found (:func:`tengine_runtime`): convert_tool,
    quant_tool_int8 with the export's scale table, one batch-1 run per image; else deployq's NumPy model of
    Tengine's x86 kernels (``exporters/tengine/reference.py``, tengine-int8.md §3.4/§5). ``kernels`` (default:
    the manifest's ``kernels``, else x86) ``arm64``: Tengine's aarch64 build under qemu, else the NumPy model of
    its kernels (``exporters/tengine/arm64.py``)."""
    import tempfile

    from deployq.exporters.tengine.reference import TengineReference

    p, shape = man["paths"], tuple(man["input"]["shape"])
    family = kernels or man.get("kernels") or "x86"
    if family == "arm64":
        return _run_tengine_arm64(man, x), {}
    tools, _ = tengine_runtime()
    if tools is None:
        return TengineReference(p["symbol"], p["params"], p["table"], shape)(x), {}
    from deployq.exporters.tengine.runtime import TengineGraph, TengineRuntimeError, build_int8_tmfile

    try:
        with tempfile.TemporaryDirectory(prefix="deployq-verify-") as tmp:
            tm = build_int8_tmfile(Path(p["symbol"]).parent, Path(tmp) / "model-int8.tmfile", tools)
            with TengineGraph(tm, shape, tools.lib) as g:
                codes = g.outputs(x)
                step = np.float32(g.out_step)
    except TengineRuntimeError as e:
        raise ValueError(f"{Path(p['symbol']).parent}: {e}") from None
    return codes.reshape(len(x), -1).astype(np.float32) * step, {}


def _run_tengine_arm64(man: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """:func:`run_tengine` for the arm64 kernel family: the emulated aarch64 runtime or the NumPy model; an
    export with a layer that build miscomputes or crashes on is refused first."""
    import tempfile

    from deployq.exporters.tengine.arm64 import Arm64TengineReference, arm64_problems, run_arm_runner
    from deployq.exporters.tengine.runtime import TengineRuntimeError, build_int8_tmfile

    p, where = man["paths"], Path(man["paths"]["symbol"]).parent
    model = Arm64TengineReference(p["symbol"], p["params"], p["table"], tuple(man["input"]["shape"]))
    bad = arm64_problems(model.graph)
    if bad:
        raise ValueError(f"{where}: Tengine's aarch64 build cannot run layer {bad[0][0]!r}: {bad[0][1]}")
    found, _ = tengine_runtime("arm64")
    if found is None:
        return model(x)
    tools, cmd = found
    try:
        with tempfile.TemporaryDirectory(prefix="deployq-verify-") as tmp:
            tm = build_int8_tmfile(where, Path(tmp) / "model-int8.tmfile", tools)
            codes, step = run_arm_runner(cmd, tm, x)
    except (TengineRuntimeError, RuntimeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return codes.reshape(len(x), -1).astype(np.float32) * np.float32(step)


def tengine_reference(man: dict[str, Any], x: np.ndarray, kernels: str = "x86") -> Reference:
    """The simulation of a Tengine export: its files re-lowered with its own scale file (every tensor's step; the
    re-export is byte-identical) and run on MXNet ops with fake-quantized tensors (``tengine.simulate``). For the
    ``arm64`` kernel family, whose fixed-point requantization has no MXNet form: deployq's NumPy model of those
    kernels on the export files (``exporters/tengine/arm64.py``)."""
    import warnings

    from deployq.exporters.ir.annotate import annotate, graph_fingerprint, load_scale_file
    from deployq.exporters.ir.frontend import from_files
    from deployq.exporters.tengine.lower import lower_model
    from deployq.exporters.tengine.simulate import simulate

    p = man["paths"]
    g = from_files(p["symbol"], p["params"], tuple(man["input"]["shape"]))
    gq = annotate(g, load_scale_file(p["scales"]), where=str(p["scales"]), fingerprint=graph_fingerprint(g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = lower_model(gq, None, name=man.get("model"))
    step = {r.tensor: r.step for r in exp.scales}
    out_step = step.get(exp.tensor_map.get(exp.graph.outputs[0], ""), 1.0)
    f32, _ = _graph_layers(g, x, [])
    if kernels == "arm64":
        from deployq.exporters.tengine.arm64 import Arm64TengineReference

        model = Arm64TengineReference(p["symbol"], p["params"], p["table"], tuple(man["input"]["shape"]))
        return Reference(model(x), {}, f32, {}, float(out_step),
                         "NumPy model of Tengine's aarch64 kernels (exporters/tengine/arm64.py) on the export files")
    return Reference(simulate(exp, x), {}, f32, {}, float(out_step), "Tengine export files + their scale file")


@runner("ncnn")
def run_ncnn(man: dict[str, Any], x: np.ndarray, layers: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The int8 ``.param``/``.bin`` (manifest files ``param``/``bin``) in the ncnn Python binding, one image at
    a time. Layer outputs are the blobs named in the manifest's ``layers`` (light mode off, so that every blob
    is kept and in-place layers work on copies); a blob that holds int8 codes (``layer_outputs[k].int8_multiplier``:
    requantize fusion) is dequantized, ``codes / multiplier``."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_int8_inference = True
    net.opt.num_threads = 1
    net.opt.use_packing_layout = False  # ncnn's packed depthwise int8 path approximates 1/scale (ncnn-int8.md §6)
    net.opt.lightmode = not layers
    for flag in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)
    if net.load_param(str(man["paths"]["param"])) != 0:
        raise ValueError(f"ncnn cannot read {man['paths']['param']}")
    if net.load_model(str(man["paths"]["bin"])) != 0:
        raise ValueError(f"ncnn cannot read {man['paths']['bin']}")
    out_blob = man.get("outputs", ["output"])[0]
    info = man.get("layer_outputs", {})
    ys, per = [], {k: [] for k in layers}
    for img in x:
        ex = net.create_extractor()
        ex.input(man["input"]["name"], ncnn.Mat(np.ascontiguousarray(img)).clone())  # clone: see ncnn-int8.md §9
        ret, mat = ex.extract(out_blob)
        if ret != 0:
            raise ValueError(f"ncnn: cannot extract blob {out_blob!r} (ret {ret})")
        ys.append(np.array(mat).reshape(-1))
        for k in layers:
            ret, m = ex.extract(man["layers"][k])
            if ret != 0:
                raise ValueError(f"ncnn: cannot extract blob {man['layers'][k]!r} of layer {k} (ret {ret})")
            per[k].append(np.array(m, np.float32))
    outs = {k: np.stack(v) for k, v in per.items()}
    for k in layers:
        mult = (info.get(k) or {}).get("int8_multiplier")
        if mult is not None:
            outs[k] = (outs[k] / np.float32(mult)).astype(np.float32)
    return np.stack(ys), outs


def ncnn_activation(v: np.ndarray, act: list[float]) -> np.ndarray:
    """ncnn's fused activation (``activation_type`` param 9 with params 10) in float32."""
    t, p = int(act[0]), [np.float32(a) for a in act[1:]]
    v = np.asarray(v, np.float32)
    if t == 0:
        return v
    if t == 1:
        return np.maximum(v, np.float32(0))
    if t == 2:
        return np.where(v > 0, v, v * p[0]).astype(np.float32)
    if t == 3:
        return np.clip(v, p[0], p[1])
    if t == 4:
        return (np.float32(1) / (np.float32(1) + np.exp(-v))).astype(np.float32)
    if t == 5:
        return (v * np.tanh(np.log1p(np.exp(v)))).astype(np.float32)
    if t == 6:
        return (v * np.clip(v * p[0] + p[1], 0, 1)).astype(np.float32)
    raise ValueError(f"ncnn activation_type {t} is not supported by deployq verify")


def ncnn_layer_reference(info: dict[str, Any] | None, y: np.ndarray, requantize: bool) -> np.ndarray:
    """What an ncnn blob holds, computed from a layer's output ``y`` (Conv/FC, BN folded, before the
    activation): the fused activation, then, with ``requantize`` and an int8 blob, the requantization onto the
    top scale's grid (``float2int8(act(y) * m) / m``, exactly what the consumer's input quantizer does in the
    simulation). The simulation is compared this way; fp32 without ``requantize``."""
    from .fakequant import np_round_half_away

    if not info:
        return y
    v = ncnn_activation(y, info.get("activation") or [0])
    m = info.get("int8_multiplier")
    if requantize and m is not None:
        m = np.float32(m)
        v = (np.clip(np_round_half_away(v * m), -127, 127) / m).astype(np.float32)
    return v


def _describe_ncnn_layer(info: dict[str, Any] | None) -> str:
    if not info:
        return "layer output"
    names = {0: "", 1: "relu", 2: "leaky relu", 3: "clip", 4: "sigmoid", 5: "mish", 6: "hardswish"}
    act = int((info.get("activation") or [0])[0])
    text = f"after fused {names.get(act, act)}" if act else "layer output"
    if info.get("int8_multiplier") is not None:
        text += f", int8 codes / {info['int8_multiplier']:.6g} vs simulation requantized on that grid"
    return text


def simulate_graph(g: Any, profile: Any, x: np.ndarray, layers: list[str], weight_convention: str | None = None
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The quantization records of ``g`` (``attach_qnet``/``attach_scales``: ``wq``/``iq`` per node) on plain
    MXNet ops, computed as the deployq simulation computes under ``profile``: weights ``codes / multiplier``
    (``multiplier`` convention, ncnn) or ``codes * step``; each quantized layer's own input fake-quantized with
    the profile's rounding and convention (``round(x * qmax/T) / (qmax/T)`` for ncnn, ``round(x / step)`` with
    the zero point for affine grids), only where that layer reads it (a residual Add still reads fp32); biases
    on the int32 grid when the profile says ``bias: int32``; an output grid (``oq`` on ``oq_tensor``) quantizes that
tensor for all its consumers. Returns (logits, {layer: Conv/FC output, before any output quantization})."""
    import mxnet as mx

    from deployq.exporters.ir.mxnet_lower import _op_symbol, run_symbol, to_symbol
    from deployq.fakequant import fake_quantize

    from .layerwise import no_subgraph_fusion

    conv = profile.scale_convention
    wconv = weight_convention or conv
    g = g.copy()
    g.params = dict(g.params)
    for n in g.nodes:
        wq = n.attrs.get("wq")
        if wq is None:
            continue
        key = n.params["weight"]
        shape = g.params[key].shape
        r = (-1,) + (1,) * (wq.codes.ndim - 1)
        if wconv == "multiplier":
            m = wq.multiplier()
            w = np.where(m.reshape(r) > 0, wq.codes.astype(np.float32) / np.where(m > 0, m, 1).reshape(r), 0)
        else:
            w = wq.codes.astype(np.float32) * wq.step.astype(np.float32).reshape(r)
        g.params[key] = w.astype(np.float32).reshape(shape)
        iq = n.attrs.get("iq")
        if getattr(profile, "bias", "float") == "int32" and iq is not None and "bias" in n.params:
            s = (np.float32(iq.step) * np.where(wq.step > 0, wq.step, 1)).astype(np.float32)
            b = g.params[n.params["bias"]].astype(np.float32)
            g.params[n.params["bias"]] = (np.rint(b / s) * s).astype(np.float32)

    def fq(sym: mx.sym.Symbol, q: Any) -> mx.sym.Symbol:
        if q.symmetric:
            scale = q.multiplier() if conv == "multiplier" else np.float32(q.step)
            return fake_quantize(mx.sym, sym, mx.sym.full((1,), float(scale)), q.qmin, q.qmax, None,
                                 profile.rounding, conv)
        zp = mx.sym.full((1,), float(q.zero_point))
        return fake_quantize(mx.sym, sym, mx.sym.full((1,), float(q.step)), q.qmin, q.qmax, zp, profile.rounding,
                             "step")

    def lower_node(n: Any, xs: list[mx.sym.Symbol], ps: dict[str, mx.sym.Symbol]) -> mx.sym.Symbol | None:
        iq = n.attrs.get("iq")
        return None if iq is None else _op_symbol(n, [fq(xs[0], iq), *xs[1:]], ps)

    # output grids (``oq`` on the tensor ``oq_tensor``): the tensor itself is quantized, for every consumer
    outq = {n.attrs["oq_tensor"]: n.attrs["oq"] for n in g.nodes if n.attrs.get("oq") is not None}

    raw: dict[str, mx.sym.Symbol] = {}

    def hook(t: str, sym: mx.sym.Symbol) -> mx.sym.Symbol:
        raw[t] = sym  # layer outputs are compared before any output quantization
        return fq(sym, outq[t]) if t in outq else sym

    tensors = {k: g.node(k).output for k in layers}
    logits, args, aux = to_symbol(g, hook, [g.outputs[0]], lower_node)
    sym = mx.sym.Group([logits, *(raw[t] for t in tensors.values())])
    with no_subgraph_fusion():
        outs = run_symbol(sym, args, aux, np.asarray(x, np.float32))
    return outs[0], dict(zip(tensors, outs[1:], strict=True))


def graph_output_step(gq: Any) -> float:
    """:func:`deployq.layerwise.output_step` from graph records: the last quantized layer's input step times
    its largest weight-row L1 norm (BN-folded weights)."""
    last = [n for n in gq.nodes if n.attrs.get("iq") is not None]
    if not last:
        raise ValueError("the graph has no quantized layer")
    n = last[-1]
    w = gq.param(n, "weight")
    return float(n.attrs["iq"].step * np.abs(w.reshape(len(w), -1)).sum(1).max())


@runner("mxnet")
def run_mxnet(man: dict[str, Any], x: np.ndarray, layers: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The exported grids on plain MXNet ops (:func:`simulate_graph` on the saved net's records under the export's
    profile) — an independent check of the records against the Gluon simulation."""
    from deployq.exporters.ir.frontend import from_gluon
    from deployq.exporters.ir.passes import optimize
    from deployq.exporters.ir.qattach import attach_qnet

    from .api import load
    from .quantizers import get_quantizer

    qnet = load(man["paths"]["qnet"])
    prof = _export_profile(man, qnet)
    g = attach_qnet(optimize(from_gluon(qnet, tuple(man["input"]["shape"]))), qnet)
    algorithm = getattr(qnet, "_deployq", {}).get("algorithm", "qat")
    return simulate_graph(g, prof, x, layers, weight_convention=get_quantizer(algorithm).weight_convention)


def _export_profile(man: dict[str, Any], qnet: Any = None) -> Any:
    """The profile the export was made under: the manifest's, else the saved net's."""
    from .profiles import load_profile

    name = man.get("profile") or (getattr(qnet, "_deployq", None) or {}).get("profile")
    if not name:
        raise ValueError("the manifest names no profile (key 'profile')")
    return load_profile(name)


# ---------------------------------------------------------------------------------------------- metrics

def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if d == 0 else float(a @ b / d)


@dataclass
class Reference:
    """What the runtime is compared with: the simulation and fp32, logits and per-layer outputs (Conv/FC
    output, BN folded, before the activation)."""

    sim: np.ndarray
    sim_layers: dict[str, np.ndarray]
    fp32: np.ndarray
    fp32_layers: dict[str, np.ndarray]
    output_step: float
    source: str


def _graph_layers(g: Any, x: np.ndarray, layers: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from deployq.exporters.ir.mxnet_lower import run

    from .layerwise import no_subgraph_fusion

    tensors = {k: g.node(k).output for k in layers}
    with no_subgraph_fusion():
        outs = run(g, x, outputs=[g.outputs[0], *tensors.values()])
    return outs[g.outputs[0]], {k: outs[t] for k, t in tensors.items()}


def reference(man: dict[str, Any], x: np.ndarray, layers: list[str], where: str | Path = "") -> Reference:
    """From the saved quantized net (the Gluon simulation), or, for an export from MXNet json/params files
    (manifest files ``symbol``/``params``/``scales``, no ``qnet``), rebuilt from those files: the fp32 graph and
    the scale file's grids on MXNet ops (:func:`simulate_graph`), as ``export-ncnn --symbol`` quantized them."""
    from deployq.exporters.ir.frontend import from_gluon
    from deployq.exporters.ir.passes import optimize

    shape = tuple(man["input"]["shape"])
    paths = man["paths"]
    if "qnet" in paths:
        from .api import load
        from .layerwise import output_step, run_layers

        qnet = load(paths["qnet"])
        sim, sim_l = run_layers(qnet, x, layers)
        f32, _ = run_layers(qnet, x, layers, fp32=True)
        _, f32_l = _graph_layers(optimize(from_gluon(qnet, shape)), x, layers)
        return Reference(sim, sim_l, f32, f32_l, output_step(qnet) or 1.0, "saved quantized net")
    if all(k in paths for k in ("symbol", "params", "scales")):
        from deployq.exporters.ir.annotate import load_scale_file
        from deployq.exporters.ir.frontend import from_files
        from deployq.exporters.ir.qattach import attach_scales

        prof = _export_profile(man)
        g = optimize(from_files(paths["symbol"], paths["params"], shape))
        gq = attach_scales(g, load_scale_file(paths["scales"]), prof)
        sim, sim_l = simulate_graph(gq, prof, x, layers)
        f32, f32_l = _graph_layers(g, x, layers)
        return Reference(sim, sim_l, f32, f32_l, graph_output_step(gq), "MXNet files + scale file")
    raise ValueError(f"{where}: the manifest names no saved quantized net (files.qnet) and no MXNet model "
                     "(files.symbol/params/scales): nothing to rebuild the simulation from")


def verify(export_dir: str | Path, engine: str | None = None, data: str | None = "builtin", limit: int | None = 1000,
           thresholds: Thresholds = Thresholds(), layers: bool = True, skip_bad: bool = False, quiet: bool = True,
           kernels: str | None = None, **runner_kw: Any) -> dict[str, Any]:
    """Run the export and compare; returns a JSON-able report with ``passed`` and ``breaches``.

    Per layer, the runtime's layer output is compared with the simulation's and fp32's. For ncnn, whose blobs
    hold what the fused layer emits, the references are transformed the same way (:func:`ncnn_layer_reference`:
    the fused activation; on an int8 blob — requantize fusion — the runtime's codes are dequantized with the top
    scale and compared with the simulation requantized on that grid). Both are exact up to float summation
    order, so that the cosine and SQNR measure the runtime, not the comparison."""
    man = read_manifest(export_dir)
    engine = engine or man["engine"]
    if engine not in RUNNERS:
        raise ValueError(f"unknown engine {engine!r}; supported: {', '.join(RUNNERS)}")
    check_engine(man, engine, export_dir)
    if kernels is not None and engine != "tengine":
        raise ValueError(f"kernels {kernels!r}: a kernel family is a Tengine option (--engine tengine)")
    if engine == "tengine":
        from deployq.exporters.tengine.kernels import check_family

        kernels = check_family(kernels or man.get("kernels") or "x86")
        runner_kw["kernels"] = kernels
    shape = tuple(man["input"]["shape"])
    x, y = load_data(data, shape, limit, export_preprocess(man), skip_bad, quiet)
    names = [k for k in man.get("layers", {})] if layers and engine != "tengine" else []
    ref = tengine_reference(man, x, kernels) if engine == "tengine" else reference(man, x, names, export_dir)
    sim, f32 = ref.sim, ref.fp32
    out, out_l = RUNNERS[engine](man, x, names, **runner_kw)
    out = out.reshape(sim.shape)
    if not np.all(np.isfinite(out)) or not np.all(np.isfinite(sim)):
        from .errors import VerificationError

        raise VerificationError(f"the {engine} outputs or the simulation hold NaN/Inf on these images",
                                where=export_dir)
    step = ref.output_step
    err = np.abs(out - sim) / step
    # a different pick where the simulation's two logits are closer than the allowed error can flip them is a
    # near-tie (random-weight 1000-class nets have many): it counts as agreeing, and is reported
    rows = np.arange(len(sim))
    agree = out.argmax(1) == sim.argmax(1)
    margin = sim[rows, sim.argmax(1)] - sim[rows, out.argmax(1)]
    agree_ties = agree | (margin <= 2 * thresholds.max_error_steps * step)
    rep: dict[str, Any] = {
        "engine": engine, "export_dir": str(export_dir), "model": man.get("model"), "images": int(len(x)),
        "reference": ref.source, "output_step": step,
        **({"kernels": kernels, "runtime": tengine_runtime(kernels)[1]} if engine == "tengine" else {}),
        "agreement_sim": float((out.argmax(1) == sim.argmax(1)).mean()),
        "agreement_sim_ties": float(agree_ties.mean()), "near_ties": int((agree_ties & ~agree).sum()),
        "agreement_fp32": float((out.argmax(1) == f32.argmax(1)).mean()),
        "max_error_steps": float(err.max()), "mean_error_steps": float(err.mean()),
        "sqnr_fp32_db": sqnr_db(f32, out),
    }
    if engine == "tengine" and kernels == "arm64":  # how far the aarch64 kernels are from the x86 simulation
        d = np.rint(np.abs(out - tengine_reference(man, x).sim.reshape(out.shape)) / step)
        rep["vs_x86_simulation"] = {"identical_images": float((d.reshape(len(x), -1).max(1) == 0).mean()),
                                    "max_codes": int(d.max())}
    if y is not None:
        rep["accuracy"] = {"runtime": float((out.argmax(1) == y).mean()), "sim": float((sim.argmax(1) == y).mean()),
                           "fp32": float((f32.argmax(1) == y).mean())}
    info = man.get("layer_outputs", {}) if engine == "ncnn" else {}
    rep["layers"] = []
    for k in names:
        if k not in ref.sim_layers or k not in out_l:
            continue
        s = ncnn_layer_reference(info.get(k), ref.sim_layers[k], True) if engine == "ncnn" else ref.sim_layers[k]
        f = ncnn_layer_reference(info.get(k), ref.fp32_layers[k], False) if engine == "ncnn" else ref.fp32_layers[k]
        o = out_l[k].reshape(s.shape)
        row = {"layer": k, "cosine_sim": cosine(s, o), "sqnr_sim_db": sqnr_db(s, o), "sqnr_fp32_db": sqnr_db(f, o)}
        if engine == "ncnn":
            row["blob"], row["compared"] = man["layers"][k], _describe_ncnn_layer(info.get(k))
        rep["layers"].append(row)
    t = thresholds
    breaches = []
    if rep["agreement_sim_ties"] < t.min_agreement:
        breaches.append(f"top-1 agreement {rep['agreement_sim_ties']:.4f} < {t.min_agreement}")
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
    lines = [f"{rep['engine']} vs simulation on {rep['images']} images ({rep['model']}; simulation from the "
             f"{rep.get('reference', 'saved quantized net')}):",
             *([f"  runtime{' (' + rep['kernels'] + ' kernels)' if rep.get('kernels') else ''}: {rep['runtime']}"]
               if rep.get("runtime") else []),
             f"  top-1 agreement {rep['agreement_sim']:.4f} (vs fp32 {rep['agreement_fp32']:.4f})"
             + (f"; {rep['near_ties']} near-tie(s) within the error bound: {rep['agreement_sim_ties']:.4f}"
                if rep.get("near_ties") else ""),
             f"  output error: max {rep['max_error_steps']:.3f}, mean {rep['mean_error_steps']:.4f} steps "
             f"(step {rep['output_step']:.4g}: one input step on every input of the last layer)"]
    if "vs_x86_simulation" in rep:
        v = rep["vs_x86_simulation"]
        lines.append(f"  vs the x86 kernels' simulation: {v['identical_images']:.4f} of images identical, max "
                     f"{v['max_codes']} output codes")
    if "accuracy" in rep:
        a = rep["accuracy"]
        lines.append(f"  accuracy: runtime {a['runtime']:.4f}, sim {a['sim']:.4f}, fp32 {a['fp32']:.4f}")
    if rep["layers"]:
        w = max(len(r["layer"]) for r in rep["layers"])
        lines.append(f"  {'layer'.ljust(w)}  cosine    SQNR/sim dB  SQNR/fp32 dB")
        lines += [f"  {r['layer'].ljust(w)}  {r['cosine_sim']:.6f}  {r['sqnr_sim_db']:11.1f}  {r['sqnr_fp32_db']:12.1f}"
                  + (f"  {r['blob']}: {r['compared']}" if "blob" in r else "") for r in rep["layers"]]
    lines.append("PASSED" if rep["passed"] else "FAILED: " + "; ".join(rep["breaches"]))
    return "\n".join(lines)
