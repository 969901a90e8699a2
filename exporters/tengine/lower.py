"""Lower an IR graph to Tengine (convert_tool + quant_tool_int8) records; every Tengine decision lives here.

Conventions (spec ``tengine-int8.md``): Tengine's *scale* is a **step**, ``x = q * step``,
``step = threshold / 127``; activations per tensor, weights per output channel with ``s_c = max|W_c| / 127``
computed by Tengine from the (BN-folded) fp32 weights we write. Tensor names are Tengine's post-fusion names:
a ReLU/ReLU6 fused into its Convolution leaves its value on the conv's tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from deployq.exporters.ir.annotate import graph_fingerprint
from deployq.exporters.ir.graph import Graph, Node, TensorQuant
from deployq.exporters.ir.mxnet_lower import tensor_shapes
from deployq.exporters.ir.passes import activation_kind, mark_fusable_activations, optimize
from deployq.exporters.ir.ranges import tensor_ranges
from deployq.exporters.tengine.bn_conv import batchnorm_as_depthwise
from deployq.exporters.tengine.rewrite import LIMITS, tengine_forms

from deployq.errors import InputError

QMAX = 127
#: IR ops Tengine's converter and int8 CPU kernels handle (after lowering softmax variants).
TENGINE_OPS = ("Convolution", "FullyConnected", "Activation", "clip", "LeakyReLU", "Pooling", "Flatten",
               "elemwise_add", "Concat", "SoftmaxActivation", "Reshape", "UpSampling", "elemwise_mul")
#: Ops whose int8 kernel copies bytes or keeps the input scale: input and output get one scale (spec §3.3);
#: nearest UpSampling requantizes (``interp_ref.c``), but copies values, so one scale keeps them exact.
PASS_THROUGH = ("Flatten", "Reshape", "UpSampling")
SOFTMAX_THRESHOLD = 1.0


class TengineExportError(InputError, ValueError):
    """The graph cannot be exported to Tengine int8 without wrong results."""


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``round``/MXNet ``round``: half away from zero (never ``np.round``, which rounds half to even).

    Exact in the input's precision: ``floor(|x| + 0.5)`` would round 0.49999997 up in float32."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + (a - f >= 0.5))


def weight_steps(w: np.ndarray) -> np.ndarray:
    """Tengine's per-output-channel weight step ``max|W_c| / 127`` (float32, as quant_tool computes it)."""
    m = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float32)
    return (m / np.float32(QMAX)).astype(np.float32)


def weight_codes(w: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """int8 codes ``clamp(round(w / s_c), -127, 127)``; channels with step 0 stay 0."""
    s = steps.reshape((-1,) + (1,) * (w.ndim - 1)).astype(np.float32)
    safe = np.where(s == 0, np.float32(1), s)
    q = np.clip(round_half_away(w.astype(np.float32) / safe), -QMAX, QMAX)
    return np.where(s == 0, 0, q).astype(np.int8)


def on_grid(w: np.ndarray, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights placed exactly on Tengine's grid: ``W = q * s_c`` with ``s_c = max|W_c| / 127``.

    ``codes`` are trained int8 codes (a quantized net); by default ``q = round(W / s_c)``. Every non-zero
    channel must reach ``|q| = 127`` so Tengine's own ``max|W| / 127`` recovers ``s_c`` and ``q``.
    Returns ``(W_grid, s_c, q)``.
    """
    s = weight_steps(w)
    q = weight_codes(w, s) if codes is None else codes.astype(np.int8)
    for _ in range(4):  # a step Tengine recomputes bit-exactly: fl(fl(127 * s) / 127) == s
        s_next = (np.float32(QMAX) * s).astype(np.float32) / np.float32(QMAX)
        if np.array_equal(s_next, s):
            break
        s = s_next.astype(np.float32)
    qmax = np.abs(q.reshape(q.shape[0], -1).astype(np.int32)).max(axis=1)
    if np.any((qmax != QMAX) & (s != 0)):
        raise ValueError("int8 weight codes must reach |q| = 127 in every non-zero channel")
    w_grid = (q.astype(np.float32) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
    return w_grid, s, q


@dataclass(frozen=True)
class ScaleRecord:
    """One line of Tengine's scale table: a post-fusion tensor and its threshold (``step = T / 127``)."""

    tensor: str
    threshold: float
    lo: float
    hi: float
    source: str

    @property
    def step(self) -> float:
        return self.threshold / QMAX


@dataclass
class TengineExport:
    """The lowered model: ``graph`` (Dropout gone, BN folded, weights on the int8 grid; what the
    json/params hold), ``scales`` (every Tengine tensor, input first), ``tensor_map`` (IR tensor -> Tengine
    tensor; a fused activation's output maps to its conv, the conv's pre-activation tensor is absent),
    ``fused`` (conv -> ``relu``/``relu6``) and the per-channel ``weight_steps``."""

    name: str
    graph: Graph
    scales: list[ScaleRecord]
    tensor_map: dict[str, str]
    fused: dict[str, str]
    weight_steps: dict[str, np.ndarray]
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    #: images behind the min-max calibration and their ``deployq.calib`` data hash (None without calibration)
    calib_samples: int | None = None
    calib_hash: str | None = None

    def scale_of(self, tengine_tensor: str) -> ScaleRecord:
        return next(s for s in self.scales if s.tensor == tengine_tensor)


def _where(g: Graph, n: Node) -> str:
    return f"{g.source or g.name}: layer {n.name!r} ({n.op})"


def check_supported(g: Graph, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Refuse what Tengine computes wrongly (spec §2.4, §3.4, §9); return warnings for what it tolerates."""
    notes: list[str] = []
    for n in g.nodes:
        a, where = n.attrs, _where(g, n)
        if n.op not in TENGINE_OPS:
            hint = (" (BatchNorm that cannot be folded into a Conv/FC: Tengine's graph optimizer folds it "
                    "across the fan-out and has no int8 BatchNorm)") if n.op == "BatchNorm" else ""
            hint = f" ({LIMITS[n.op]})" if n.op in LIMITS else hint
            raise TengineExportError(f"{where}: op {n.op} is not exportable to Tengine int8{hint}; "
                                     f"supported ops: {', '.join(TENGINE_OPS)}")
        if n.op == "Convolution" and any(d != 1 for d in a["dilate"]):
            raise TengineExportError(f"{where}: dilation {a['dilate']} - Tengine's converter ignores "
                                     "'dilate' and would run it as dilation 1")
        if n.op == "Convolution" and len(a["kernel"]) != 2:
            raise TengineExportError(f"{where}: only 2-D convolutions are supported by Tengine")
        if n.op in ("Convolution", "FullyConnected"):
            oc = g.param(n, "weight").shape[0]
            if oc == 1:
                raise TengineExportError(f"{where}: one output channel - Tengine int8 loses its weight scale "
                                         "and segfaults (issue #1027); give the layer >= 2 outputs")
            s = weight_steps(g.param(n, "weight"))
            bias = g.param(n, "bias")
            dead = np.flatnonzero(s == 0)
            if dead.size and bias is not None and np.any(bias[dead] != 0):
                raise TengineExportError(
                    f"{where}: output channel(s) {dead.tolist()} have all-zero weights but a non-zero bias; "
                    "Tengine's quant tool divides the bias by s_w*s_in = 0 (int32 overflow). Remove the "
                    "channel or zero its bias")
            if dead.size:
                notes.append(f"{where}: output channel(s) {dead.tolist()} have all-zero weights and bias "
                             "(their int8 output is exactly 0)")
        if n.op == "Pooling" and a["pool_type"] == "avg" and not a["global_pool"] and any(a["pad"]) \
                and a["count_include_pad"] in (None, True) and a["pooling_convention"] == "valid":
            raise TengineExportError(f"{where}: padded average pooling with count_include_pad=True - Tengine "
                                     "ignores count_include_pad (wrong border values); use "
                                     "count_include_pad=False or no padding")
        if n.op == "Pooling" and a["pool_type"] not in ("max", "avg"):
            raise TengineExportError(f"{where}: pool_type {a['pool_type']}; supported: max, avg")
        if n.op == "Activation" and a["act_type"] not in ("relu", "sigmoid", "tanh", "softmax"):
            raise TengineExportError(f"{where}: act_type {a['act_type']}; "
                                     "supported: relu, sigmoid, tanh, softmax")
        if n.op == "clip" and activation_kind(n) != "relu6":
            raise TengineExportError(f"{where}: clip({a['a_min']}, {a['a_max']}); "
                                     "Tengine accepts only clip(0, 6)")
        fused_into = g.node(a["fusable_into"]).op if "fusable_into" in a else None
        if n.op == "clip" and fused_into != "Convolution":
            raise TengineExportError(f"{where}: ReLU6 not fused into a Convolution - "
                                     "Tengine has no int8 ReLU6")
        if n.op == "LeakyReLU" and a["act_type"] != "leaky":
            raise TengineExportError(f"{where}: LeakyReLU act_type {a['act_type']}; supported: leaky")
        if n.op == "Concat" and a["dim"] != 1:
            raise TengineExportError(f"{where}: Concat along dim {a['dim']}; supported: dim 1 (channels)")
        if n.op in ("elemwise_add", "elemwise_mul") and len({shapes[t] for t in n.inputs}) != 1:
            raise TengineExportError(f"{where}: inputs of different shapes")
        if n.op == "Reshape" and (a["reverse"] or a["shape"][:1] != (0,)):
            raise TengineExportError(f"{where}: Reshape {a['shape']} (reverse={a['reverse']}) mixes the batch "
                                     "axis; Tengine's int8 Reshape is written only as (0, ...) per image")
        if n.op == "UpSampling" and (a["sample_type"] != "nearest" or len(n.inputs) != 1):
            raise TengineExportError(f"{where}: UpSampling {a['sample_type']} with {len(n.inputs)} input(s); "
                                     "Tengine's converter maps UpSampling to Interp, written for nearest with one "
                                     "input only (MXNet's bilinear UpSampling is a deconvolution with a weight)")
    return notes


def _rewrite_softmax(g: Graph, shapes: dict[str, tuple[int, ...]]) -> None:
    """``softmax`` / ``SoftmaxOutput`` -> ``SoftmaxActivation`` (Tengine rejects lowercase softmax)."""
    for n in g.nodes:
        a = n.attrs
        plain = n.op == "softmax" and len(shapes[n.inputs[0]]) == 2 and a["axis"] in (1, -1) \
            and a["temperature"] in (None, 1.0)
        if n.op == "SoftmaxOutput" or plain:
            n.op, n.attrs = "SoftmaxActivation", {"mode": "channel" if a.get("multi_output") else "instance"}
        elif n.op == "Activation" and n.attrs["act_type"] == "softmax":
            n.op, n.attrs = "SoftmaxActivation", {"mode": "channel"}


def tengine_tensor_map(g: Graph) -> tuple[dict[str, str], dict[str, str]]:
    """IR tensor -> Tengine tensor after convert_tool's Conv+ReLU/ReLU6 fusion, and the fused convs."""
    mapping = {t: t for t in g.tensors()}
    fused: dict[str, str] = {}
    for n in g.nodes:
        kind = activation_kind(n)
        conv = g.node(n.attrs["fusable_into"]) if "fusable_into" in n.attrs else None
        into_conv = conv is not None and conv.op == "Convolution"
        if kind in ("relu", "relu6") and n.op != "LeakyReLU" and into_conv:
            del mapping[conv.output]
            mapping[n.output] = conv.output
            fused[conv.name] = kind
    return mapping, fused


def _union_find_groups(g: Graph, mapping: dict[str, str]) -> dict[str, str]:
    """Tengine tensor -> group root, joining the input and output of pass-through ops (Flatten, max pooling,
    standalone ReLU) whose input has a single consumer: Tengine's inplace mode gives them one scale (§3.3)."""
    parent = {t: t for t in mapping.values()}

    def find(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    for n in g.nodes:
        through = (n.op in PASS_THROUGH or (n.op == "Pooling" and n.attrs["pool_type"] == "max")
                   or (activation_kind(n) == "relu" and mapping[n.output] == n.output))
        if through and len(g.consumers(n.inputs[0])) == 1:
            parent[find(mapping[n.output])] = find(mapping[n.inputs[0]])
    return {t: find(t) for t in parent}


def lower(g: Graph, ranges: dict[str, tuple[float, float]] | None = None, name: str | None = None,
          fingerprint: str = "") -> TengineExport:
    """Lower a :func:`prepare`-d graph for Tengine int8.

    ``ranges`` (``exporters.ranges.tensor_ranges`` on the prepared graph) give thresholds ``max(|lo|, |hi|)``;
    thresholds on ``g.quant`` (a scale file, a quantized net; names resolved through folds) win.
    """
    quant = {g.resolve(k): v for k, v in g.quant.items()}
    shapes = tensor_shapes(g)
    notes = check_supported(g, shapes)
    mapping, fused = tengine_tensor_map(g)
    ranges = ranges or {}
    thr: dict[str, ScaleRecord] = {}
    for ir_t, tg_t in mapping.items():
        q = quant.get(ir_t) or quant.get(tg_t)  # IR name, else the Tengine name (a re-imported export)
        if q is not None:
            thr[tg_t] = ScaleRecord(tg_t, q.threshold, q.lo, q.hi, q.source or "scale-file")
        elif ir_t in ranges:
            lo, hi = ranges[ir_t]
            thr[tg_t] = ScaleRecord(tg_t, max(abs(lo), abs(hi)), lo, hi, "calibration-minmax")
        else:
            raise TengineExportError(f"{g.name}: tensor {ir_t!r} has no threshold (no scale-file entry and "
                                     "no calibration range); Tengine needs a scale for every tensor")
    for n in g.nodes:  # softmax outputs lie in [0, 1]: Tengine's own tools use step 1/127
        if n.op == "SoftmaxActivation":
            t = mapping[n.output]
            thr[t] = ScaleRecord(t, SOFTMAX_THRESHOLD, 0.0, 1.0, "softmax")
    groups = _union_find_groups(g, mapping)
    members_of: dict[str, list[str]] = {}
    for t, r in groups.items():
        members_of.setdefault(r, []).append(t)
    for members in members_of.values():
        if len(members) > 1:
            given = [thr[t] for t in members if not thr[t].source.startswith("calibration")]
            best = max(given or [thr[t] for t in members], key=lambda r: r.threshold)  # given ones win
            for t in members:
                thr[t] = ScaleRecord(t, best.threshold, thr[t].lo, thr[t].hi, best.source + "+shared")
    # Tengine's int8 concat clamps values below -127 to +127: keep s_out >= every s_in; a raised concat output
    # raises its whole pass-through group (quant_tool's inplace mode would give it the max pooling's scale)
    changed = True
    while changed:
        changed = False
        for n in g.nodes:
            if n.op != "Concat":
                continue
            need = max(thr[mapping[i]].threshold for i in n.inputs)
            if thr[mapping[n.output]].threshold < need:
                changed = True
                for t in members_of[groups[mapping[n.output]]]:
                    thr[t] = ScaleRecord(t, need, thr[t].lo, thr[t].hi, thr[t].source + "+concat")
    for t, r in list(thr.items()):
        if not r.threshold > 0:
            notes.append(f"{g.name}: tensor {t!r} is all zero over calibration; threshold set to 1.0")
            thr[t] = ScaleRecord(t, 1.0, r.lo, r.hi, r.source + "+zero")
    order = [g.input_name] + [mapping[t] for n in g.nodes for t in n.outputs if t in mapping]
    scales = [thr[t] for t in dict.fromkeys(order)]
    steps = {n.name: weight_steps(g.param(n, "weight")) for n in g.nodes
             if n.op in ("Convolution", "FullyConnected")}
    for msg in notes:
        warnings.warn(msg, stacklevel=2)
    return TengineExport(name or g.name, g, scales, mapping, fused, steps, fingerprint, notes)


def _rename_dropped_params(g: Graph) -> None:
    """Tengine's converter drops graph inputs whose name contains ``label`` or ``state`` (spec §2.2): rename
    such params (``enc.state.weight`` -> ``enc.stat_.weight``)."""
    for n in g.nodes:
        for role, key in n.params.items():
            if "label" in key or "state" in key:
                new = key.replace("label", "labl_").replace("state", "stat_")
                g.params[new] = g.params.pop(key)
                n.params[role] = new


MIXED_PRECISION_HINT = ("Tengine int8 has no mixed precision (quant_tool_int8 quantizes every Convolution and "
                        "FullyConnected); export all layers quantized, or use export-ncnn / export-onnx, which "
                        "keep those layers in fp32")


def refuse_mixed_precision(g: Graph, fp32_layers: Iterable[str] = ()) -> None:
    """Raise when a quantized net (nodes carrying ``quant_layer``) keeps some Conv/FC in fp32 (excluded, or
    without weight or input quantization), or when ``fp32_layers`` (a scale file's unquantized layers) is
    not empty: Tengine would quantize them anyway."""
    weighted = [n for n in g.nodes if n.op in ("Convolution", "FullyConnected")
                and not n.attrs.get("from_batchnorm") and not n.attrs.get("lowered_from")]  # deployq's own convs
    fp32 = list(fp32_layers)
    if any("quant_layer" in n.attrs for n in g.nodes):
        fp32 += [n.name for n in weighted if n.attrs.get("wq") is None or n.attrs.get("iq") is None]
    if fp32:
        raise TengineExportError(f"{g.name}: layers kept in fp32: {', '.join(sorted(set(fp32)))}; "
                                 f"{MIXED_PRECISION_HINT}")


def prepare(graph: Graph, codes: dict[str, np.ndarray] | None = None) -> Graph:
    """The graph Tengine will run: Dropout dropped, BN folded (or, where it cannot be, a 1x1 depthwise conv),
    activations marked, softmax variants renamed,
    Conv/FC weights on the per-channel int8 grid.

    Trained int8 codes come from ``codes`` (layer -> int8 array) or from ``exporters.qattach`` records on the
    nodes (``attrs['wq']``); a quantized layer's input threshold (``attrs['iq']``) becomes its input tensor's
    annotation, winning over calibration.
    """
    g = mark_fusable_activations(tengine_forms(batchnorm_as_depthwise(optimize(graph))))
    _rewrite_softmax(g, tensor_shapes(g))
    _rename_dropped_params(g)
    codes = dict(codes or {})
    refuse_mixed_precision(g)
    for n in g.nodes:
        if n.op not in ("Convolution", "FullyConnected"):
            continue
        wq, iq = n.attrs.get("wq"), n.attrs.get("iq")
        if wq is not None:
            if (wq.qmin, wq.qmax) != (-QMAX, QMAX) or wq.granularity != "channel":
                raise TengineExportError(
                    f"{_where(g, n)}: weights quantized to [{wq.qmin}, {wq.qmax}] per {wq.granularity}; "
                    "Tengine int8 uses [-127, 127] per output channel (quantize with profile='tengine')")
            codes.setdefault(n.name, wq.codes)
        if iq is not None:
            if not (iq.symmetric and iq.signed and iq.qmax == QMAX):
                raise TengineExportError(f"{_where(g, n)}: input grid is not symmetric signed int8 "
                                         "(Tengine int8 needs it; quantize with profile='tengine')")
            g.quant.setdefault(n.inputs[0], TensorQuant(iq.threshold, iq.lo, iq.hi, "quantized-net"))
        try:
            g.params[n.params["weight"]] = on_grid(g.param(n, "weight"), codes.get(n.name))[0]
        except ValueError as e:
            raise TengineExportError(f"{_where(g, n)}: {e}; Tengine recomputes s_c = max|W_c|/127 and would "
                                     "land on a different grid") from None
    return g


def lower_model(graph: Graph, calib_batches: Iterable[np.ndarray] | None, name: str | None = None,
                codes: dict[str, np.ndarray] | None = None) -> TengineExport:
    """:func:`prepare`, min-max calibrate tensors without a threshold on ``calib_batches``, :func:`lower`."""
    from deployq.calib.scalefile import StreamHash

    g = prepare(graph, codes)
    fingerprint = graph_fingerprint(g)  # of the model written (a BatchNorm may have become a conv)
    batches = None if calib_batches is None else [np.asarray(b, np.float32) for b in calib_batches]
    ranges = tensor_ranges(g, batches) if batches is not None else None
    exp = lower(g, ranges, name, fingerprint)
    if batches is not None:
        h = StreamHash()
        for b in batches:
            h.update(b)
        exp.calib_samples, exp.calib_hash = h.n, h.hexdigest()
    return exp
