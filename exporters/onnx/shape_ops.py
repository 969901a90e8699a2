"""ONNX lowering of the IR's shape, resize and pointwise ops (one handler per op, registered in
:mod:`deployq.exporters.onnx.registry`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from deployq.exporters.ir.graph import Node, UnsupportedOpError
from deployq.exporters.onnx.registry import handles
from onnx import TensorProto, helper


def _i64(ctx: Any, name: str, values: list[int] | tuple[int, ...]) -> str:
    return ctx.const(name, np.array(list(values), np.int64))


def _f32(ctx: Any, name: str, value: float) -> str:
    return ctx.const(name, np.array(value, np.float32))


@handles("Reshape", "expand_dims")
def _reshape(ctx: Any, n: Node) -> None:
    if n.op == "Reshape" and n.attrs["shape"][:1] != (0,):
        raise UnsupportedOpError(f"node {n.name}: op Reshape that moves the batch axis (shape "
                                 f"{n.attrs['shape']}) is not supported")
    shape = [0, *ctx.shape(n.output)[1:]]
    ctx.emit("Reshape", [n.inputs[0], _i64(ctx, f"{n.name}.shape", shape)], [n.output], name=n.name)


@handles("SwapAxis")
def _swapaxis(ctx: Any, n: Node) -> None:
    rank = len(ctx.shape(n.output))
    perm = list(range(rank))
    d1, d2 = n.attrs["dim1"] % rank, n.attrs["dim2"] % rank
    perm[d1], perm[d2] = perm[d2], perm[d1]
    ctx.emit("Transpose", n.inputs, [n.output], name=n.name, perm=perm)


def _slice_nodes(ctx: Any, n: Node, starts: list[int], ends: list[int], axes: list[int]) -> None:
    ctx.emit("Slice", [n.inputs[0], _i64(ctx, f"{n.name}.starts", starts), _i64(ctx, f"{n.name}.ends", ends),
                       _i64(ctx, f"{n.name}.axes", axes)], [n.output], name=n.name)


@handles("slice_axis")
def _slice_axis(ctx: Any, n: Node) -> None:
    shape = ctx.shape(n.inputs[0])
    a = n.attrs["axis"] % len(shape)
    if a == 0:
        raise UnsupportedOpError(f"node {n.name}: op slice_axis over the batch axis is not supported")
    b, e = slice(n.attrs["begin"], n.attrs["end"]).indices(shape[a])[:2]
    _slice_nodes(ctx, n, [b], [e], [a])


@handles("slice")
def _slice(ctx: Any, n: Node) -> None:
    shape = ctx.shape(n.inputs[0])
    a = n.attrs
    steps = list(a["step"]) + [None] * (len(a["begin"]) - len(a["step"]))
    rng = [slice(b, e, s).indices(shape[k]) for k, (b, e, s) in enumerate(zip(a["begin"], a["end"], steps,
                                                                             strict=True))]
    axes = [k for k, r in enumerate(rng) if r != (0, shape[k], 1)] or [1]
    if 0 in axes:
        raise UnsupportedOpError(f"node {n.name}: op slice over the batch axis is not supported")
    ins = [n.inputs[0], _i64(ctx, f"{n.name}.starts", [rng[k][0] for k in axes]),
           _i64(ctx, f"{n.name}.ends", [rng[k][1] for k in axes]), _i64(ctx, f"{n.name}.axes", axes)]
    if any(rng[k][2] != 1 for k in axes):
        ins.append(_i64(ctx, f"{n.name}.steps", [rng[k][2] for k in axes]))
    ctx.emit("Slice", ins, [n.output], name=n.name)


@handles("Pad")
def _pad(ctx: Any, n: Node) -> None:
    mode = {"constant": "constant", "edge": "edge", "reflect": "reflect"}.get(n.attrs["mode"])
    if mode is None:
        raise UnsupportedOpError(f"node {n.name}: op Pad mode={n.attrs['mode']} (constant, edge, reflect)")
    pw = n.attrs["pad_width"]
    pads = list(pw[0::2]) + list(pw[1::2])
    ins = [n.inputs[0], _i64(ctx, f"{n.name}.pads", pads)]
    if mode == "constant":
        ins.append(_f32(ctx, f"{n.name}.value", n.attrs["constant_value"]))
    ctx.emit("Pad", ins, [n.output], name=n.name, mode=mode)


@handles("sum")
def _sum(ctx: Any, n: Node) -> None:
    rank = len(ctx.shape(n.inputs[0]))
    axes = sorted({a % rank for a in n.attrs["axis"]}) if n.attrs["axis"] else list(range(rank))
    if n.attrs["exclude"]:
        axes = [a for a in range(rank) if a not in axes]
    ctx.emit("ReduceSum", [n.inputs[0], _i64(ctx, f"{n.name}.axes", axes)], [n.output], name=n.name,
             keepdims=int(n.attrs["keepdims"]))


@handles("_contrib_AdaptiveAvgPooling2D")
def _adaptive(ctx: Any, n: Node) -> None:
    raise UnsupportedOpError(f"node {n.name}: op _contrib_AdaptiveAvgPooling2D with output_size "
                             f"{n.attrs['output_size']} on input {ctx.shape(n.inputs[0])[2:]}: ONNX has no "
                             "adaptive pooling (sizes that divide the input, and 1x1, are supported)")


@handles("_contrib_BilinearResize2D")
def _bilinear(ctx: Any, n: Node) -> None:
    mode = "align_corners" if n.attrs["align_corners"] else "half_pixel"
    # sizes = (N, C) of the input at run time + MXNet's output (H, W): the batch stays dynamic
    shape, nc, sizes = f"{n.name}.in_shape", f"{n.name}.nc", f"{n.name}.sizes"
    ctx.emit("Shape", [n.inputs[0]], [shape], name=shape)
    ctx.emit("Slice", [shape, _i64(ctx, f"{n.name}.zero", [0]), _i64(ctx, f"{n.name}.two", [2])], [nc], name=nc)
    ctx.emit("Concat", [nc, _i64(ctx, f"{n.name}.hw", list(ctx.shape(n.output)[2:]))], [sizes], name=sizes,
             axis=0)
    ctx.emit("Resize", [n.inputs[0], "", "", sizes], [n.output], name=n.name, mode="linear",
             coordinate_transformation_mode=mode)


@handles("UpSampling")
def _upsampling(ctx: Any, n: Node) -> None:
    if n.attrs["sample_type"] != "nearest" or len(n.inputs) != 1:
        raise UnsupportedOpError(f"node {n.name}: op UpSampling sample_type={n.attrs['sample_type']} with "
                                 f"{len(n.inputs)} inputs (nearest, one input)")
    s = float(n.attrs["scale"])
    scales = ctx.const(f"{n.name}.scales", np.array([1, 1, s, s], np.float32))
    ctx.emit("Resize", [n.inputs[0], "", scales], [n.output], name=n.name, mode="nearest",
             coordinate_transformation_mode="asymmetric", nearest_mode="floor")


@handles("elemwise_mul")
def _mul(ctx: Any, n: Node) -> None:
    ctx.emit("Mul", n.inputs, [n.output], name=n.name)


_SCALAR = {"_plus_scalar": ("Add", False), "_minus_scalar": ("Sub", False), "_mul_scalar": ("Mul", False),
           "_div_scalar": ("Div", False), "_rminus_scalar": ("Sub", True)}


@handles(*_SCALAR)
def _scalar(ctx: Any, n: Node) -> None:
    op, reverse = _SCALAR[n.op]
    c = _f32(ctx, f"{n.name}.scalar", n.attrs["scalar"])
    ctx.emit(op, [c, n.inputs[0]] if reverse else [n.inputs[0], c], [n.output], name=n.name)


@handles("ShuffleChannel")
def _shuffle(ctx: Any, n: Node) -> None:
    _, c, h, w = ctx.shape(n.output)
    g = n.attrs["group"]
    a, b = f"{n.name}.split", f"{n.name}.swap"
    ctx.emit("Reshape", [n.inputs[0], _i64(ctx, f"{a}.shape", [0, g, c // g, h, w])], [a], name=a)
    ctx.emit("Transpose", [a], [b], name=b, perm=[0, 2, 1, 3, 4])
    ctx.emit("Reshape", [b, _i64(ctx, f"{n.name}.shape", [0, c, h, w])], [n.output], name=n.name)


@handles("HardSigmoid")
def _hard_sigmoid(ctx: Any, n: Node) -> None:
    ctx.emit("HardSigmoid", n.inputs, [n.output], name=n.name, alpha=n.attrs["alpha"], beta=n.attrs["beta"])


@handles("HardSwish")
def _hard_swish(ctx: Any, n: Node) -> None:
    gate = f"{n.name}.gate"
    ctx.emit("HardSigmoid", n.inputs, [gate], name=gate, alpha=n.attrs["alpha"], beta=n.attrs["beta"])
    ctx.emit("Mul", [n.inputs[0], gate], [n.output], name=n.name)


@handles("ones_like")
def _ones_like(ctx: Any, n: Node) -> None:
    ctx.emit("Shape", n.inputs, [f"{n.name}.shape"], name=f"{n.name}.shape")
    ctx.emit("ConstantOfShape", [f"{n.name}.shape"], [n.output], name=n.name,
             value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
