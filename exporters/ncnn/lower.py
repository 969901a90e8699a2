"""IR -> ncnn layer records (fp32 or int8). Every ncnn decision is made here; ``write`` only serialises.

Decisions: layer types and param ids (spec ncnn-int8.md §5), activations fused into Convolution/InnerProduct
(param 9/10), ``Split`` layers for fan-out (``splitncnn_<k>``, tops ``<blob>_splitncnn_<i>``), int8 terms as
ncnn2int8 writes them (8=2 Conv/IP, 8=1 DW, +100 with a top scale under requantize fusion), int8 weight codes
``float2int8(W_f * multiplier)``, ``31=64`` (no winograd) on 8-bit int8 3x3 stride-1 convolutions, and the
calibration table ncnn2int8 reads.
"""

from __future__ import annotations

import numpy as np
from deployq.exporters.ir.graph import Graph, GraphError, Node, UnsupportedOpError
from deployq.exporters.ir.mxnet_lower import tensor_shapes
from deployq.exporters.ir.passes import activation_kind
from deployq.exporters.ncnn.records import LayerRecord, NcnnModel, ParamValue, WeightBlob
from deployq.exporters.ncnn.shape_ops import KEEPS_VECTOR, LOWERINGS, Ctx

from deployq.fakequant import np_round_half_away

INT8_TAG = 0x000D4B38
FP32_TAG = 0x00000000
CONV_LIKE = ("Convolution", "ConvolutionDepthWise")
QUANTIZABLE = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
#: fused activation kind -> (ncnn activation_type, activation_params)
FUSED_ACTIVATION: dict[str, tuple[int, tuple[float, ...]]] = {"relu": (1, ()), "relu6": (3, (0.0, 6.0)),
                                                              "sigmoid": (4, ())}
# ---------------------------------------------------------------------------------------------- helpers
def float2int8(v: np.ndarray) -> np.ndarray:
    """ncnn's float2int8: C round (half away from zero), clamp to [-127, 127]."""
    return np.clip(np_round_half_away(np.asarray(v, np.float32)), -127, 127).astype(np.int8)


def weight_multipliers(node: Node) -> np.ndarray:
    """Per-output-channel ncnn weight multipliers ``qmax / max|W_f|`` (float32, 0 for a dead channel)."""
    return node.attrs["wq"].multiplier()


def is_int8(node: Node) -> bool:
    """A Conv/FC runs int8 in ncnn when both its weights and its (symmetric, signed) input are quantized."""
    iq = node.attrs.get("iq")
    return "wq" in node.attrs and iq is not None and iq.symmetric and iq.signed


def winograd_guard(node: Node) -> bool:
    """``31=64`` for an int8 3x3 stride-1 dilation-1 non-depthwise conv with full 8-bit weights (spec §6)."""
    a = node.attrs
    return (node.op == "Convolution" and a["num_group"] == 1 and tuple(a["kernel"]) == (3, 3)
            and tuple(a["stride"]) == (1, 1) and tuple(a["dilate"]) == (1, 1) and node.attrs["wq"].qmax > 31)


# ---------------------------------------------------------------------------------------------- lowering
def _fused_activation(g: Graph, node: Node) -> tuple[Node | None, tuple[int, tuple[float, ...]]]:
    kind = node.attrs.get("fusable_activation")
    if kind not in FUSED_ACTIVATION and kind != "leaky":
        return None, (0, ())
    act = next((c for c in g.consumers(node.output) if c.attrs.get("fusable_into") == node.name), None)
    if act is None or node.output in g.outputs:
        return None, (0, ())
    if kind == "leaky":
        return act, (2, (float(act.attrs["slope"]),))
    return act, FUSED_ACTIVATION[kind]


def pointwise_on_vector(node: Node) -> bool:
    """A 1x1 stride-1 unpadded ungrouped conv: on ncnn's 1-D blob (after global pooling) it is an InnerProduct."""
    a = node.attrs
    return (node.op == "Convolution" and tuple(a["kernel"]) == (1, 1) and tuple(a["stride"]) == (1, 1)
            and not any(a["pad"]) and a["num_group"] == 1)


def _weight_layer(g: Graph, node: Node, int8: bool, bottom: str, top: str,
                  act: tuple[int, tuple[float, ...]], on_vector: bool = False) -> LayerRecord:
    a = node.attrs
    w = g.param(node, "weight")
    b = g.param(node, "bias")
    quant = int8 and is_int8(node)
    if "wq" in node.attrs and not quant:  # weight-only quantized: the simulated (dequantized) weights in fp32
        wq = node.attrs["wq"]
        w = (wq.codes * wq.step.reshape((-1,) + (1,) * (wq.codes.ndim - 1))).astype(np.float32).reshape(w.shape)
    if node.op == "Convolution" and on_vector:
        if not pointwise_on_vector(node):
            raise UnsupportedOpError(f"{node.name}: ncnn exporter: a {a['kernel']} convolution on a globally "
                                     "pooled (1-D in ncnn) tensor")
        ltype = "InnerProduct"
        params = {0: a["num_filter"], 1: int(b is not None), 2: int(w.size)}
    elif node.op == "Convolution":
        group = a["num_group"]
        ltype = "Convolution" if group == 1 else "ConvolutionDepthWise"
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = a["kernel"], a["stride"], a["dilate"], a["pad"]
        params: dict[int, ParamValue] = {0: a["num_filter"], 1: kw, 11: kh, 2: dw, 12: dh, 3: sw, 13: sh, 4: pw,
                                         14: ph, 5: int(b is not None), 6: int(w.size)}
        if group != 1:
            params[7] = group
    elif node.op == "FullyConnected":
        if not a["flatten"]:
            raise UnsupportedOpError(f"{node.name}: FullyConnected with flatten=False is not supported by ncnn "
                                     "InnerProduct")
        ltype = "InnerProduct"
        params = {0: a["num_hidden"], 1: int(b is not None), 2: int(w.size)}
    else:
        raise AssertionError(node.op)
    if act[0]:
        params[9] = act[0]
        if act[1]:
            params[10] = act[1]
    rec = LayerRecord(ltype, node.name, [bottom], [top], params)
    if not quant:
        rec.weights = [WeightBlob(w.astype(np.float32), FP32_TAG)]
        if b is not None:
            rec.weights.append(WeightBlob(b.astype(np.float32)))
        return rec
    mult = weight_multipliers(node)
    codes = float2int8(w * mult.reshape((-1,) + (1,) * (w.ndim - 1)))
    if ltype == "ConvolutionDepthWise":
        group = params[7]
        per_group = mult.reshape(group, -1)
        if not np.all(per_group == per_group[:, :1]):
            raise GraphError(
                f"layer {node.name!r} (Convolution, {group} groups): int8 weights with one scale per channel, but "
                "ncnn's ConvolutionDepthWise keeps one weight scale per group; quantize it on the ncnn profile's "
                "per-group grid (deployq.quantize/calibrate with profile ncnn) or keep it fp32 (config "
                "exclude: true)")
        mult = per_group[:, 0].copy()
    params[8] = 1 if ltype == "ConvolutionDepthWise" else 2
    if ltype == "Convolution" and winograd_guard(node):
        params[31] = 64
    rec.params = dict(sorted(params.items()))
    bottom_m = node.attrs["iq"].multiplier()
    rec.weights = [WeightBlob(codes, INT8_TAG)]
    if b is not None:
        rec.weights.append(WeightBlob(b.astype(np.float32)))
    rec.weights += [WeightBlob(mult.astype(np.float32)), WeightBlob(np.array([bottom_m], np.float32))]
    rec.bottom_multiplier = np.float32(bottom_m)
    return rec


def _activation_layer(node: Node, kind: str | None, bottom: str) -> LayerRecord:
    if kind == "relu":
        return LayerRecord("ReLU", node.name, [bottom], [node.output])
    if kind == "leaky":
        return LayerRecord("ReLU", node.name, [bottom], [node.output], {0: float(node.attrs["slope"])})
    if kind == "relu6" or node.op == "clip":
        return LayerRecord("Clip", node.name, [bottom], [node.output],
                           {0: float(node.attrs["a_min"]), 1: float(node.attrs["a_max"])})
    if kind == "sigmoid":
        return LayerRecord("Sigmoid", node.name, [bottom], [node.output])
    if kind == "tanh":
        return LayerRecord("TanH", node.name, [bottom], [node.output])
    raise UnsupportedOpError(f"{node.name}: ncnn exporter: unsupported activation {node.op} {node.attrs}")


def _pooling_layer(node: Node, bottom: str) -> LayerRecord:
    a = node.attrs
    if a["pool_type"] not in ("max", "avg"):
        raise UnsupportedOpError(f"{node.name}: ncnn exporter: pool_type {a['pool_type']} (max/avg only)")
    ptype = 0 if a["pool_type"] == "max" else 1
    if a["global_pool"]:
        return LayerRecord("Pooling", node.name, [bottom], [node.output], {0: ptype, 4: 1})
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["pad"]
    pad_mode = {"valid": 1, "full": 0}.get(a["pooling_convention"])
    if pad_mode is None:
        raise UnsupportedOpError(f"{node.name}: pooling_convention {a['pooling_convention']} (valid/full only)")
    params: dict[int, ParamValue] = {0: ptype, 1: kw, 11: kh, 2: sw, 12: sh, 3: pw, 13: ph, 14: pw, 15: ph,
                                     5: pad_mode}
    if ptype == 1:  # MXNet's count_include_pad defaults to True
        params[6] = 0 if a["count_include_pad"] is False else 1
    return LayerRecord("Pooling", node.name, [bottom], [node.output], params)


def _softmax_axis(node: Node, rank: int) -> int:
    axis = node.attrs.get("axis", 1) if node.op == "softmax" else 1
    axis = axis % rank
    if node.op == "SoftmaxOutput" and rank != 2 and not node.attrs["multi_output"]:
        raise UnsupportedOpError(f"{node.name}: SoftmaxOutput over a rank-{rank} tensor")
    if axis == 0:
        raise UnsupportedOpError(f"{node.name}: softmax over the batch axis")
    return axis - 1


def lower(g: Graph, int8: bool = False) -> NcnnModel:
    """The graph (optimized; for int8 with ``attach_qnet``/``attach_scales`` records) as ncnn layers."""
    shapes = tensor_shapes(g)
    ranks = {t: len(v) for t, v in shapes.items()}
    c, h, w = g.input_shape[1:]
    layers = [LayerRecord("Input", g.input_name, [], [g.input_name], {0: w, 1: h, 2: c})]
    skip: set[str] = set()
    vectors: set[str] = set()  # tensors that are 1-D blobs in ncnn (global pooling, InnerProduct, Flatten)
    for node in g.nodes:
        if node.name in skip:
            continue
        xs = list(node.inputs)
        keeps = node.op not in ("broadcast_add", "broadcast_mul") and (node.op not in LOWERINGS
                                                                       or node.op in KEEPS_VECTOR)
        if (node.op in ("FullyConnected", "Flatten") or (node.op == "Pooling" and node.attrs["global_pool"])
                or any(t in vectors for t in xs) and keeps):
            vectors.add(node.output)
        if node.op in LOWERINGS:
            LOWERINGS[node.op](node, Ctx(shapes, vectors), layers)
        elif node.op in ("Convolution", "FullyConnected"):
            act_node, act = _fused_activation(g, node)
            top = node.output
            if act_node is not None:
                skip.add(act_node.name)
                top = act_node.output
                vectors.update([top] if node.output in vectors else [])
            layers.append(_weight_layer(g, node, int8, xs[0], top, act, on_vector=xs[0] in vectors))
        elif node.op in ("Activation", "clip", "LeakyReLU"):
            layers.append(_activation_layer(node, activation_kind(node), xs[0]))
        elif node.op == "Pooling":
            layers.append(_pooling_layer(node, xs[0]))
        elif node.op == "BatchNorm":
            layers.append(_batchnorm_layer(g, node, xs[0]))
        elif node.op == "Flatten":
            layers.append(LayerRecord("Flatten", node.name, xs, [node.output]))
        elif node.op == "elemwise_add":
            layers.append(LayerRecord("Eltwise", node.name, xs, [node.output], {0: 1}))
        elif node.op in ("broadcast_add", "broadcast_mul"):
            layers.append(LayerRecord("BinaryOp", node.name, xs, [node.output],
                                      {0: 0 if node.op == "broadcast_add" else 2}))
        elif node.op == "Concat":
            dim = node.attrs["dim"] % ranks[xs[0]]
            if dim == 0:
                raise UnsupportedOpError(f"{node.name}: Concat over the batch axis")
            layers.append(LayerRecord("Concat", node.name, xs, [node.output], {0: dim - 1}))
        elif node.op in ("softmax", "SoftmaxActivation", "SoftmaxOutput"):
            if node.op == "softmax" and node.attrs.get("temperature") not in (None, 1.0):
                raise UnsupportedOpError(f"{node.name}: softmax with temperature")
            axis = _softmax_axis(node, ranks[xs[0]])
            layers.append(LayerRecord("Softmax", node.name, xs, [node.output], {0: axis, 1: 1}))
        else:
            raise UnsupportedOpError(f"{node.name}: ncnn exporter: unsupported op {node.op}")
    model = NcnnModel(layers, g.input_name, list(g.outputs))
    insert_splits(model)
    if int8:
        fuse_requantize(model)
    return model


def _batchnorm_layer(g: Graph, node: Node, bottom: str) -> LayerRecord:
    if node.attrs["axis"] != 1:
        raise UnsupportedOpError(f"{node.name}: BatchNorm over axis {node.attrs['axis']}")
    gamma = g.param(node, "gamma")
    slope = np.ones_like(gamma) if node.attrs["fix_gamma"] else gamma
    arrays = [slope, g.param(node, "moving_mean"), g.param(node, "moving_var"), g.param(node, "beta")]
    return LayerRecord("BatchNorm", node.name, [bottom], [node.output], {0: int(gamma.size), 1: node.attrs["eps"]},
                       [WeightBlob(np.asarray(v, np.float32)) for v in arrays])


def insert_splits(model: NcnnModel) -> None:
    """A ``Split`` after every blob read by more than one layer (ncnn: one consumer per blob), named like
    caffe2ncnn: layer ``splitncnn_<k>``, tops ``<blob>_splitncnn_<i>`` in consumer order."""
    out: list[LayerRecord] = []
    k = 0
    for ly in list(model.layers):
        out.append(ly)
        for top in ly.tops:
            users = [(u, i) for u in model.layers for i, b in enumerate(u.bottoms) if b == top]
            if len(users) < 2:
                continue
            tops = [f"{top}_splitncnn_{j}" for j in range(len(users))]
            out.append(LayerRecord("Split", f"splitncnn_{k}", [top], tops))
            k += 1
            for (u, i), t in zip(users, tops, strict=True):
                u.bottoms[i] = t
    model.layers = out


def fuse_requantize(model: NcnnModel) -> None:
    """ncnn2int8's requantize fusion: an int8 Convolution/ConvolutionDepthWise whose output feeds an int8
    conv directly, or a Split whose outputs all feed int8 convs, emits int8 (``8 += 100``, top scale = the
    consumer's input multiplier). Through a Split only when every consumer has the same multiplier (deployq
    simulates one grid per consumer; ncnn would give them all one). Never into a graph output."""
    consumers = {b: u for u in model.layers for b in u.bottoms}

    def int8_conv(ly: LayerRecord | None) -> bool:
        return ly is not None and ly.type in CONV_LIKE and ly.bottom_multiplier is not None

    for ly in model.layers:
        if not int8_conv(ly) or ly.tops[0] in model.output_blobs:
            continue
        nxt = consumers.get(ly.tops[0])
        targets = [consumers.get(t) for t in nxt.tops] if nxt is not None and nxt.type == "Split" else [nxt]
        if not targets or not all(int8_conv(t) for t in targets):
            continue
        ms = {float(t.bottom_multiplier) for t in targets}
        if len(ms) != 1:
            continue
        ly.params[8] = int(ly.params[8]) + 100
        ly.weights.append(WeightBlob(np.array([targets[0].bottom_multiplier], np.float32)))


# ---------------------------------------------------------------------------------------------- table
def scale_table(g: Graph) -> list[tuple[str, list[float]]]:
    """ncnn2table's entries for the int8 layers: every ``<layer>_param_0`` (weight multipliers, per group for
    depthwise) first, then every ``<layer>`` (input multiplier). fp32 layers get neither line."""
    weights, blobs = [], []
    for node in g.nodes:
        if node.op not in ("Convolution", "FullyConnected") or not is_int8(node):
            continue
        m = weight_multipliers(node)
        if node.op == "Convolution" and node.attrs["num_group"] > 1:
            m = m.reshape(node.attrs["num_group"], -1)[:, 0]
        weights.append((f"{node.name}_param_0", [float(v) for v in m]))
        blobs.append((node.name, [float(node.attrs["iq"].multiplier())]))
    return weights + blobs
