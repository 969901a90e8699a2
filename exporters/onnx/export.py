"""Graph IR -> ONNX (opset 13) with QuantizeLinear/DequantizeLinear pairs carrying deployq's own grids.

Run it on an optimized graph (BN folded) with ``attach_qnet``/``attach_scales`` records: every Conv/Gemm node
with ``attrs["wq"]`` gets its int8 codes as an int8 initializer and a per-channel ``DequantizeLinear``
(axis 0, ``scale = step``, zero point 0); every node with ``attrs["iq"]`` gets ``QuantizeLinear`` +
``DequantizeLinear`` on its input (uint8 with ``zero_point`` for affine grids, int8 with zero point 0 for
symmetric signed ones); every node with ``attrs["oq"]`` gets ``QuantizeLinear`` + ``DequantizeLinear`` on the
tensor ``attrs["oq_tensor"]`` (its output, or the ReLU after it), which its consumers then read, so that
onnxruntime fuses ``DQ -> Conv -> [Relu] -> Q`` into QLinearConv where the layer feeds no quantized layer (a
consumer whose input grid is that same grid reads the pair directly). Biases stay fp32, or with
``int32_bias`` (the profile's ``"bias": "int32"``) become int32 codes on ``input_step * weight_step[c]`` with
their own ``DequantizeLinear``: what onnxruntime's fused QLinearConv/QGemm add (its default optimizations
quantize a float bias that way themselves). Nodes without records stay fp32, and ``quantize=False`` gives the
plain fp32 model from the same code path.

4-bit grids (``int4``, default: whenever a record has 4 bits or fewer, e.g. the ``custom`` profile with
``quant_bits`` 4) use ONNX's 4-bit types: weight codes become ``INT4`` initializers (two codes per byte, the first
in the low nibble, as ONNX packs them) with an ``INT4`` zero point, and 4-bit activation grids ``UINT4``/``INT4``
zero points, so that ``QuantizeLinear`` saturates at the grid's own ends ([0, 15], [-8, 7]) as the simulation
clamps. Those types need opset 21 and IR version 10; exports without 4-bit grids stay opset 13, IR 8, int8/uint8.

Lowering is a registry (:data:`HANDLERS`, op -> function). Handlers *declare* what they need from the
emitter (``ctx.act_input``, ``ctx.weight``, ``ctx.const``) and the emitter writes the nodes.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from deployq.exporters.ir.graph import Graph, Node, UnsupportedOpError
from deployq.exporters.ir.qattach import InputQuant, WeightQuant
from deployq.exporters.onnx import shape_ops  # noqa: F401  (registers the shape, resize and pointwise ops)
from deployq.exporters.onnx.registry import HANDLERS, handles
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
OPSET_INT4 = 21  # INT4/UINT4 in QuantizeLinear/DequantizeLinear
BATCH_DIM = "N"


def grid_key(q: InputQuant) -> tuple[float, int, bool]:
    """What identifies an activation grid in the model: (float32 step, zero point, signed)."""
    return float(np.float32(q.step)), int(q.zero_point), bool(q.signed)


class OnnxContext:
    """The model under construction: nodes, initializers and the QDQ pairs already emitted (shared per
    tensor and grid so that two layers reading one tensor on one grid share one QuantizeLinear)."""

    def __init__(self, g: Graph, quantize: bool, int32_bias: bool = False, int4: bool = False) -> None:
        self.g, self.quantize, self.int32_bias, self.int4 = g, quantize, int32_bias, int4
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._qdq: dict[tuple[str, float, int, bool], str] = {}  # (tensor, grid) -> its codes
        self._oq: dict[str, tuple[str, tuple[float, int, bool]]] = {}  # dequantized layer output -> (codes, grid)
        #: integer code tensors -> (grid, scale initializer, zero-point initializer)
        self.codes: dict[str, tuple[tuple[float, int, bool], str, str]] = {}
        self._dq: set[str] = set()
        self._shapes: dict[str, tuple[int, ...]] | None = None
        #: renamed tensor (a quantized output's dequantized copy) -> the IR tensor it carries
        self.source: dict[str, str] = {}

    def shape(self, tensor: str) -> tuple[int, ...]:
        """MXNet shape (batch 1) of an IR tensor, or of the renamed copy of one."""
        if self._shapes is None:
            from deployq.exporters.ir.mxnet_lower import tensor_shapes

            self._shapes = tensor_shapes(self.g)
        return self._shapes[self.source.get(tensor, tensor)]

    def const(self, name: str, arr: np.ndarray) -> str:
        if name not in self.inits:
            # np.ascontiguousarray turns a 0-d array into shape (1,); onnxruntime fuses QDQ around Add and
            # pooling (QLinearAdd, QLinearGlobalAveragePool) only with scalar scales and zero points
            a = np.asarray(arr)
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(a) if a.ndim else a, name)
        return name

    def const4(self, name: str, arr: np.ndarray, signed: bool) -> str:
        """A 4-bit integer initializer (INT4 when ``signed``, else UINT4), packed as ONNX packs them."""
        if name not in self.inits:
            self.inits[name] = pack_4bit(name, np.asarray(arr), signed)
        return name

    def emit(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))

    def act_input(self, node: Node, tensor: str) -> str:
        """``tensor`` as the quantized layer ``node`` reads it: through its own QDQ pair when it has an input
        grid (``attrs['iq']``), else unchanged. A tensor of integer codes (:meth:`quant_codes`) is dequantized;
        a quantized layer output already on this grid is read as it is (quantizing again changes nothing)."""
        if tensor in self.codes:
            return self.dequant(tensor)
        iq: InputQuant | None = node.attrs.get("iq")
        if not self.quantize or iq is None:
            return tensor
        return self.dequant(self.quant_codes(node, tensor))

    def quant_codes(self, node: Node, tensor: str) -> str:
        """``tensor`` as integer codes on ``node``'s input grid: one QuantizeLinear per tensor and grid, shared
        by the layers reading it; a quantized layer output on that grid gives its own codes."""
        iq: InputQuant = node.attrs["iq"]
        key = (tensor, *grid_key(iq))
        if tensor in self._oq and self._oq[tensor][1] == key[1:]:
            return self._oq[tensor][0]
        if key not in self._qdq:
            k = sum(1 for t in self._qdq if t[0] == tensor)
            self._qdq[key] = self.quant(node, tensor, iq, f"{tensor}.q{k}" if k else f"{tensor}.q")
        return self._qdq[key]

    def quant(self, node: Node, tensor: str, iq: InputQuant, base: str) -> str:
        """``QuantizeLinear`` of ``tensor`` on the grid ``iq``; returns the code tensor ``base``."""
        dtype = np.int8 if iq.signed else np.uint8
        if not (np.iinfo(dtype).min <= iq.qmin and iq.qmax <= np.iinfo(dtype).max):
            raise ValueError(f"node {node.name}: activation grid [{iq.qmin}, {iq.qmax}] does not fit ONNX "
                             f"{np.dtype(dtype).name}")
        scale = self.const(f"{base}.step", np.array(iq.step, np.float32))
        if self.int4 and fits_4bit(iq.bits, iq.qmin, iq.qmax, iq.signed):
            zp = self.const4(f"{base}.zero_point", np.array(iq.zero_point), iq.signed)
        else:
            zp = self.const(f"{base}.zero_point", np.array(iq.zero_point, dtype))
        self.emit("QuantizeLinear", [tensor, scale, zp], [base], name=f"{base}.QuantizeLinear")
        self.codes[base] = (grid_key(iq), scale, zp)
        return base

    def dequant(self, codes: str) -> str:
        """``DequantizeLinear`` of the code tensor ``codes`` (one per code tensor); returns ``<codes>.dq``."""
        out = f"{codes}.dq"
        if out not in self._dq:
            _, scale, zp = self.codes[codes]
            self.emit("DequantizeLinear", [codes, scale, zp], [out], name=f"{codes}.DequantizeLinear")
            self._dq.add(out)
        return out

    def output_qdq(self, node: Node, tensor: str, oq: InputQuant) -> str:
        """The QDQ pair of a quantized layer output ``tensor``; its consumers read the returned tensor."""
        codes = self.quant(node, tensor, oq, f"{tensor}.oq")
        out = self.dequant(codes)
        self._oq[out] = (codes, grid_key(oq))
        return out

    def weight(self, node: Node) -> str:
        """The weight input of ``node``: int8 codes + per-channel DequantizeLinear, or the fp32 array."""
        key = node.params["weight"]
        wq: WeightQuant | None = node.attrs.get("wq")
        if not self.quantize or wq is None:
            return self.const(key, self.g.params[key])
        if wq.qmin < -128 or wq.qmax > 127:
            raise ValueError(f"node {node.name}: weight grid [{wq.qmin}, {wq.qmax}] does not fit int8")
        step = weight_dq_step(wq)
        scale = self.const(f"{key}.step", step)
        if self.int4 and fits_4bit(wq.bits, wq.qmin, wq.qmax, True):
            codes = self.const4(f"{key}.codes", wq.codes.reshape(self.g.params[key].shape), True)
            zp = self.const4(f"{key}.zero_point", np.zeros(len(step), np.int8), True)
        else:
            codes = self.const(f"{key}.codes", wq.codes.astype(np.int8).reshape(self.g.params[key].shape))
            zp = self.const(f"{key}.zero_point", np.zeros(len(step), np.int8))
        out = f"{key}.dq"
        self.emit("DequantizeLinear", [codes, scale, zp], [out], name=f"{node.name}.weight.DequantizeLinear",
                  axis=0)
        return out

    def bias(self, node: Node) -> list[str]:
        """The bias input of ``node``: fp32, or (``int32_bias`` and a quantized input and weight) int32 codes
        + per-channel ``DequantizeLinear`` on the grid ``input_step * weight_step[c]``, the grid onnxruntime's
        QLinearConv/QGemm add it on; the codes are ``round_half_even(b / grid)`` in float32, as onnxruntime's
        own BiasQuantization computes them, so the unfused and the fused kernels add the same bias."""
        key = node.params.get("bias")
        if key is None:
            return []
        b = self.g.params[key]
        iq: InputQuant | None = node.attrs.get("iq")
        wq: WeightQuant | None = node.attrs.get("wq")
        if not (self.quantize and self.int32_bias and iq is not None and wq is not None):
            return [self.const(key, b)]
        grid = bias_grid(iq, wq)
        codes = np.rint(b.astype(np.float32) / grid)
        if np.abs(codes).max(initial=0) > np.iinfo(np.int32).max:
            raise ValueError(f"node {node.name}: bias does not fit int32 on the grid input_step * weight_step")
        ins = [self.const(f"{key}.codes", codes.astype(np.int32)), self.const(f"{key}.step", grid),
               self.const(f"{key}.zero_point", np.zeros(len(grid), np.int32))]
        out = f"{key}.dq"
        self.emit("DequantizeLinear", ins, [out], name=f"{node.name}.bias.DequantizeLinear", axis=0)
        return [out]


def fits_4bit(bits: int, qmin: int, qmax: int, signed: bool) -> bool:
    """A grid of at most 4 bits whose codes fit ONNX's INT4 ([-8, 7], ``signed``) or UINT4 ([0, 15])."""
    lo, hi = (-8, 7) if signed else (0, 15)
    return bits <= 4 and lo <= qmin and qmax <= hi


def has_4bit_grids(g: Graph) -> bool:
    """Whether a quantization record of ``g`` is a 4-bit grid (what ``int4=None`` turns 4-bit types on for)."""
    for n in g.nodes:
        wq, grids = n.attrs.get("wq"), [n.attrs.get("iq"), n.attrs.get("oq")]
        if wq is not None and fits_4bit(wq.bits, wq.qmin, wq.qmax, True):
            return True
        if any(q is not None and fits_4bit(q.bits, q.qmin, q.qmax, q.signed) for q in grids):
            return True
    return False


def pack_4bit(name: str, codes: np.ndarray, signed: bool) -> onnx.TensorProto:
    """ONNX's INT4/UINT4 tensor of integer ``codes``: two per byte in row-major order, element ``2k`` in the low
    nibble of byte ``k``, ``2k+1`` in the high one, an odd count padded with a zero nibble (raw_data)."""
    lo, hi = (-8, 7) if signed else (0, 15)
    flat = np.asarray(codes).astype(np.int64).reshape(-1)
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(f"{name}: codes in [{flat.min()}, {flat.max()}] do not fit {'INT4' if signed else 'UINT4'}")
    nib = (flat & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    packed = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4, list(np.shape(codes)),
                              packed.tobytes(), raw=True)


def weight_dq_step(wq: WeightQuant) -> np.ndarray:
    """The per-channel scale of a weight's DequantizeLinear (1 for a dead channel, whose codes are 0)."""
    return np.where(wq.step > 0, wq.step, 1.0).astype(np.float32)


def bias_grid(iq: InputQuant, wq: WeightQuant) -> np.ndarray:
    """The int32 bias grid of a quantized Conv/Gemm, ``float32(input_step) * weight_dq_step`` in float32."""
    return (np.float32(iq.step) * weight_dq_step(wq)).astype(np.float32)


@handles("Convolution")
def _conv(ctx: OnnxContext, n: Node) -> None:
    a = n.attrs
    if len(a["kernel"]) != 2:
        raise UnsupportedOpError(f"node {n.name}: op Convolution with a {len(a['kernel'])}-D kernel (only 2-D)")
    x = ctx.act_input(n, n.inputs[0])
    ctx.emit("Conv", [x, ctx.weight(n), *ctx.bias(n)], [n.output], name=n.name, kernel_shape=list(a["kernel"]),
             strides=list(a["stride"]), dilations=list(a["dilate"]), pads=list(a["pad"]) * 2, group=a["num_group"])


@handles("FullyConnected")
def _fc(ctx: OnnxContext, n: Node) -> None:
    if not n.attrs["flatten"]:
        raise UnsupportedOpError(f"node {n.name}: op FullyConnected with flatten=False is not supported")
    x = n.inputs[0]
    if ctx.quantize and "iq" in n.attrs and x not in ctx.codes:
        x = ctx.quant_codes(n, x)  # quantize, then flatten the codes (as _reshapes_on_codes)
    flat = f"{n.name}.flatten"
    ctx.emit("Flatten", [x], [flat], name=flat, axis=1)
    if x in ctx.codes:
        ctx.codes[flat] = ctx.codes[x]
    ctx.emit("Gemm", [ctx.act_input(n, flat), ctx.weight(n), *ctx.bias(n)], [n.output], name=n.name, transB=1)


@handles("BatchNorm")
def _bn(ctx: OnnxContext, n: Node) -> None:
    if n.attrs["axis"] != 1:
        raise UnsupportedOpError(f"node {n.name}: op BatchNorm on axis {n.attrs['axis']} (only axis 1)")
    gamma = ctx.g.param(n, "gamma")
    if n.attrs["fix_gamma"]:
        gamma = np.ones_like(gamma)
    ins = [ctx.const(f"{n.params['gamma']}.used", gamma)] + [ctx.const(n.params[r], ctx.g.param(n, r))
                                                             for r in ("beta", "moving_mean", "moving_var")]
    ctx.emit("BatchNormalization", [n.inputs[0], *ins], [n.output], name=n.name, epsilon=n.attrs["eps"])


_ACTIVATIONS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "softrelu": "Softplus"}


@handles("Activation")
def _act(ctx: OnnxContext, n: Node) -> None:
    kind = n.attrs["act_type"]
    if kind not in _ACTIVATIONS:
        raise UnsupportedOpError(f"node {n.name}: op Activation act_type={kind} is not supported "
                                 f"(supported: {', '.join(_ACTIVATIONS)})")
    ctx.emit(_ACTIVATIONS[kind], n.inputs, [n.output], name=n.name)


@handles("clip")
def _clip(ctx: OnnxContext, n: Node) -> None:
    lo = ctx.const(f"{n.name}.min", np.array(n.attrs["a_min"], np.float32))
    hi = ctx.const(f"{n.name}.max", np.array(n.attrs["a_max"], np.float32))
    ctx.emit("Clip", [n.inputs[0], lo, hi], [n.output], name=n.name)


@handles("LeakyReLU")
def _leaky(ctx: OnnxContext, n: Node) -> None:
    if n.attrs["act_type"] != "leaky":
        raise UnsupportedOpError(f"node {n.name}: op LeakyReLU act_type={n.attrs['act_type']} (only leaky)")
    ctx.emit("LeakyRelu", n.inputs, [n.output], name=n.name, alpha=n.attrs["slope"])


@handles("Pooling")
def _pool(ctx: OnnxContext, n: Node) -> None:
    a = n.attrs
    kind = {"max": "Max", "avg": "Average"}.get(a["pool_type"])
    if kind is None:
        raise UnsupportedOpError(f"node {n.name}: op Pooling pool_type={a['pool_type']} (only max, avg)")
    if a["global_pool"]:
        ctx.emit(f"Global{kind}Pool", n.inputs, [n.output], name=n.name)
        return
    kw = {"kernel_shape": list(a["kernel"]), "strides": list(a["stride"]), "pads": list(a["pad"]) * 2,
          "ceil_mode": int(a["pooling_convention"] == "full")}
    if kind == "Average":
        kw["count_include_pad"] = int(a["count_include_pad"] is not False)
    ctx.emit(f"{kind}Pool", n.inputs, [n.output], name=n.name, **kw)


@handles("Flatten")
def _flatten(ctx: OnnxContext, n: Node) -> None:
    ctx.emit("Flatten", n.inputs, [n.output], name=n.name, axis=1)


@handles("elemwise_add", "broadcast_add")
def _add(ctx: OnnxContext, n: Node) -> None:
    ctx.emit("Add", n.inputs, [n.output], name=n.name)


@handles("broadcast_mul")
def _mul(ctx: OnnxContext, n: Node) -> None:
    ctx.emit("Mul", n.inputs, [n.output], name=n.name)


@handles("Concat")
def _concat(ctx: OnnxContext, n: Node) -> None:
    ctx.emit("Concat", n.inputs, [n.output], name=n.name, axis=n.attrs["dim"])


@handles("Dropout")
def _dropout(ctx: OnnxContext, n: Node) -> None:
    ctx.emit("Identity", n.inputs, [n.output], name=n.name)


@handles("softmax")
def _softmax(ctx: OnnxContext, n: Node) -> None:
    if n.attrs["temperature"] not in (None, 1.0):
        raise UnsupportedOpError(f"node {n.name}: op softmax with temperature={n.attrs['temperature']}")
    ctx.emit("Softmax", n.inputs, [n.output], name=n.name, axis=n.attrs["axis"])


@handles("SoftmaxActivation", "SoftmaxOutput")
def _softmax_act(ctx: OnnxContext, n: Node) -> None:
    channel = n.attrs.get("mode") == "channel" or n.attrs.get("multi_output", False)
    if channel:
        ctx.emit("Softmax", n.inputs, [n.output], name=n.name, axis=1)
    else:  # instance: softmax over the flattened features
        flat = f"{n.name}.flatten"
        ctx.emit("Flatten", n.inputs, [flat], name=flat, axis=1)
        ctx.emit("Softmax", [flat], [n.output], name=n.name, axis=1)


def _reshapes_on_codes(g: Graph) -> dict[str, Node]:
    """Flatten nodes that run on integer codes: node name -> the quantized Dense they feed. A Dense whose input
    comes through Flatten nodes (each output read once) is quantized before them and dequantized right before
    its Gemm (quantization is elementwise, so it commutes with a reshape): onnxruntime then sees
    ``DQ -> Gemm`` (QGemm), and ``DQ -> GlobalAveragePool -> Q`` before it (QLinearGlobalAveragePool)."""
    out: dict[str, Node] = {}
    for n in g.nodes:
        if n.op != "FullyConnected" or "iq" not in n.attrs:
            continue
        t = n.inputs[0]
        while (p := g.producer(t)) is not None and p.op == "Flatten" and g.n_uses(t) == 1:
            out[p.name] = n
            t = p.inputs[0]
    return out


def to_onnx(g: Graph, quantize: bool = True, opset: int = OPSET, producer: str = "deployq",
            int32_bias: bool = False, int4: bool | None = None) -> onnx.ModelProto:
    """The ONNX model of ``g`` (run ``passes.optimize`` first; quantization records from ``qattach``).

    The input keeps ``g.input_shape`` except a dynamic batch dimension ``N``; initializers are not graph
    inputs. ``int4``: 4-bit grids in INT4/UINT4 (opset >= 21, IR 10); None: when ``g`` has 4-bit grids; False:
    int8/uint8 containers (runtimes without 4-bit types; a 4-bit input grid's QuantizeLinear then saturates at the
    container's ends, not the grid's, so values the simulation clamps pass through). Raises
    ``UnsupportedOpError`` naming node and op for an op without a handler.
    """
    if opset < 13:
        raise ValueError(f"opset {opset}: deployq writes opset 13+ (per-channel DequantizeLinear needs 13)")
    int4 = quantize and (has_4bit_grids(g) if int4 is None else int4)
    if int4:
        opset = max(opset, OPSET_INT4)
    ctx = OnnxContext(g, quantize, int32_bias, int4)
    # quantized layer outputs: tensor -> (layer node, grid); consumers read the dequantized tensor instead
    oq = {n.attrs["oq_tensor"]: (n, n.attrs["oq"]) for n in g.nodes if quantize and "oq" in n.attrs}
    reshapes = _reshapes_on_codes(g) if quantize else {}
    renamed: dict[str, str] = {}
    for n in g.nodes:
        fn = HANDLERS.get(n.op)
        if fn is None:
            raise UnsupportedOpError(f"{g.name}: node {n.name!r}: op {n.op} has no ONNX lowering; supported ops: "
                                     f"{', '.join(sorted(HANDLERS))}")
        ins = [renamed.get(t, t) for t in n.inputs]
        layer = reshapes.get(n.name)
        if layer is not None and ins[0] not in ctx.codes:
            ins[0] = ctx.quant_codes(layer, ins[0])
        fn(ctx, replace(n, inputs=ins) if ins != n.inputs else n)
        if layer is not None:
            ctx.codes[n.output] = ctx.codes[ins[0]]
        for t in n.outputs:
            if t in oq:
                renamed[t] = ctx.output_qdq(oq[t][0], t, oq[t][1])
                ctx.source[renamed[t]] = t
    shape = [BATCH_DIM, *g.input_shape[1:]]
    inp = helper.make_tensor_value_info(g.input_name, TensorProto.FLOAT, shape)
    outs = [helper.make_tensor_value_info(renamed.get(t, t), TensorProto.FLOAT, None) for t in g.outputs]
    graph = helper.make_graph(ctx.nodes, g.name, [inp], outs, initializer=list(ctx.inits.values()))
    model = helper.make_model(graph, producer_name=producer, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if int4 else 8  # onnxruntime >= 1.17 reads IR 8..10; 8: the oldest with opset 13+; 10: INT4
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model)
    return model


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary name in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Serialize deterministically (same model -> same bytes) and write atomically."""
    return write_atomic(path, model.SerializeToString(deterministic=True))


def export_qnet(qnet, out_dir: str | os.PathLike, model_name: str = "model",
                input_shape: tuple[int, ...] | None = None, fp32: bool = True,
                int32_bias: bool | None = None, preprocess: Any = None, int4: bool | None = None) -> dict[str, Path]:
    """Export a deployq-quantized Gluon net to ``out_dir``: ``model.onnx`` (QDQ), ``model.fp32.onnx``,
    ``scales.json``, the saved quantized net ``qnet.params``/``qnet.deployq.json`` and the manifest.

    Layers the config list keeps in fp32 get no QDQ. ``int32_bias`` (default: the net's profile says
    ``"bias": "int32"``) writes the biases of quantized layers as int32 codes (see ``OnnxContext.bias``).
    ``preprocess`` (a :class:`deployq.preprocess.Preprocess`) is stated in the manifest and ``USAGE.txt``.
    ``int4``: as :func:`to_onnx` (default: INT4/UINT4 for the net's 4-bit grids, opset 21). Re-running gives
    byte-identical files.
    """
    import json
    import warnings

    from deployq.exporters.ir.frontend import from_gluon
    from deployq.exporters.ir.passes import optimize
    from deployq.exporters.ir.qattach import attach_qnet

    import deployq
    import deployq.api
    from deployq.atomic import export_dir
    from deployq.manifest import write_manifest

    layers = deployq.quant_layers(qnet)
    if not layers:
        raise ValueError("export_qnet needs a deployq-quantized net (deployq.quantize(net, profile='onnx'))")
    if int32_bias is None:
        int32_bias = any(getattr(blk.profile, "bias", "float") == "int32" for blk in layers.values())
    unset = [p for p, b in layers.items() if b.layer_config.output is not None and b.output_range() is None]
    unset += [f"{p} (block output)" for p, q in deployq.api.output_quantizers(qnet).items() if q.output_range() is None]
    if unset:
        warnings.warn(f"{len(unset)} quantized output(s) have no range (never trained nor calibrated: "
                      f"{', '.join(unset[:4])}{', ...' if len(unset) > 4 else ''}); they stay float in the simulation "
                      f"and get no QuantizeLinear, so onnxruntime cannot run the ops around them on integers. Set "
                      f"them with deployq.layerwise.calibrate_outputs(qnet, images).", stacklevel=2)
    out = Path(out_dir)
    input_shape = tuple(input_shape or (preprocess.input_shape if preprocess is not None else (1, 3, 32, 32)))
    g = optimize(from_gluon(qnet, input_shape, name=model_name))
    gq = attach_qnet(g, qnet)
    files = {"model": "model.onnx", "scales": "scales.json", "qnet": "qnet"}
    models = {"model": to_onnx(gq, quantize=True, int32_bias=int32_bias, int4=int4)}
    if fp32:
        files["fp32"] = "model.fp32.onnx"
        models["fp32"] = to_onnx(g, quantize=False)
    scales = deployq.export_scales(qnet, model_name)
    tensors = {path: path for path in layers}  # runtime tensor of each layer's output
    with export_dir(out) as tmp:  # every file appears at once, with the manifest (SHA-256 of each file)
        for key, model in models.items():
            save_onnx(model, tmp / files[key])
        (tmp / files["scales"]).write_bytes((json.dumps(scales, indent=2, sort_keys=True) + "\n").encode())
        deployq.save(qnet, tmp / files["qnet"], model_name, input_shape, preprocess=preprocess)
        extra = {}
        if preprocess is not None:
            from deployq.preprocess import usage_text

            files["usage"] = "USAGE.txt"
            (tmp / files["usage"]).write_text(usage_text(preprocess, "onnx", {"onnx": files["model"]}))
            extra["preprocess"] = preprocess.to_dict()
        write_manifest(tmp, "onnxruntime", model_name, input_shape, files, tensors,
                       f"deployq {deployq.__version__} export-onnx",
                       profile=getattr(qnet, "_deployq", {}).get("profile"), outputs=list(g.outputs), **extra)
    return {k: out / v for k, v in files.items()}
