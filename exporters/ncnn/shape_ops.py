"""ncnn lowering of the IR's shape, resize and pointwise ops: one function per op, one registry entry each.

ncnn blobs drop the batch axis: an MXNet (N, C, H, W) tensor is ncnn's 3-D (c, h, w), (N, K) is 1-D (w),
(N, A, B) is 2-D (h, w), (N, A, B, H, W) 4-D (c, d, h, w). Per-image axis ``k`` of MXNet is ncnn axis ``k-1``.
A tensor after global pooling is 1-D in ncnn although MXNet keeps (N, C, 1, 1): ops that need the real
shape get a ``Reshape`` to it first (:func:`faithful`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deployq.exporters.ir.graph import Node, UnsupportedOpError
from deployq.exporters.ir.normalize.pad import spatial_pads
from deployq.exporters.ncnn.records import LayerRecord, ParamValue

#: ncnn's Permute order types: output axes (w, h[, d], c) named by input axis, per input dims (permute.cpp).
_PERMUTE_NAMES = {
    2: ["w h", "h w"],
    3: ["w h c", "h w c", "w c h", "c w h", "h c w", "c h w"],
    4: ["w h d c", "h w d c", "w d h c", "d w h c", "h d w c", "d h w c", "w h c d", "h w c d", "w c h d",
        "c w h d", "h c w d", "c h w d", "w d c h", "d w c h", "w c d h", "c w d h", "d c w h", "c d w h",
        "h d c w", "d h c w", "h c d w", "c h d w", "d c h w", "c d h w"],
}
_AXIS_NAMES = {2: "h w", 3: "c h w", 4: "c d h w"}  # ncnn axes outermost first
_BINARY_SCALAR = {"_plus_scalar": 0, "_minus_scalar": 1, "_mul_scalar": 2, "_div_scalar": 3,
                  "_rminus_scalar": 7}


@dataclass
class Ctx:
    """What a lowering needs: MXNet shapes (batch included) and the tensors ncnn holds as 1-D blobs."""

    shapes: dict[str, tuple[int, ...]]
    vectors: set[str]

    def per_image(self, t: str) -> tuple[int, ...]:
        return tuple(self.shapes[t][1:])


def _unsupported(n: Node, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"{n.name}: ncnn exporter: op {n.op}: {why}")


def reshape_params(shape: tuple[int, ...]) -> dict[int, ParamValue]:
    """ncnn Reshape params (0=w, 1=h, 11=d, 2=c) for a per-image shape (outermost first)."""
    if not 1 <= len(shape) <= 4:
        raise ValueError(f"rank {len(shape)}")
    keys = {1: (0,), 2: (1, 0), 3: (2, 1, 0), 4: (2, 11, 1, 0)}[len(shape)]
    return dict(zip(keys, shape, strict=True))


def faithful(n: Node, ctx: Ctx, bottom: str, out: list[LayerRecord]) -> str:
    """``bottom`` as a blob of its real MXNet shape (a Reshape after a 1-D global-pooling blob)."""
    shape = ctx.per_image(bottom)
    if bottom not in ctx.vectors or len(shape) == 1:
        return bottom
    top = f"{bottom}_{n.name}_reshape"
    out.append(LayerRecord("Reshape", f"{n.name}_reshape", [bottom], [top], reshape_params(shape)))
    return top


def permute_order(perm: tuple[int, ...]) -> int:
    """ncnn Permute order_type for a per-image axis permutation (output axis i = input axis perm[i])."""
    dims = len(perm)
    if dims not in _PERMUTE_NAMES:
        raise ValueError(f"Permute of a {dims}-D blob")
    names = _AXIS_NAMES[dims].split()
    want = " ".join(names[p] for p in reversed(perm))  # ncnn lists the output innermost first
    return _PERMUTE_NAMES[dims].index(want)


def _reshape(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    shape = ctx.per_image(n.output)
    if n.attrs["shape"][:1] != (0,):
        raise _unsupported(n, "a reshape that moves the batch axis")
    if not 1 <= len(shape) <= 4:
        raise _unsupported(n, f"rank-{len(shape) + 1} tensor (ncnn blobs hold at most 4 axes per image)")
    out.append(LayerRecord("Reshape", n.name, [n.inputs[0]], [n.output], reshape_params(shape)))


def _swapaxis(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    rank = len(ctx.shapes[n.inputs[0]])
    d1, d2 = n.attrs["dim1"] % rank, n.attrs["dim2"] % rank
    if 0 in (d1, d2):
        raise _unsupported(n, "swaps the batch axis")
    perm = list(range(rank - 1))
    perm[d1 - 1], perm[d2 - 1] = perm[d2 - 1], perm[d1 - 1]
    if rank - 1 not in _PERMUTE_NAMES:
        raise _unsupported(n, f"a rank-{rank} tensor (ncnn Permute takes 2-4 axes per image)")
    x = faithful(n, ctx, n.inputs[0], out)
    out.append(LayerRecord("Permute", n.name, [x], [n.output], {0: permute_order(tuple(perm))}))


def _crop(n: Node, ctx: Ctx, out: list[LayerRecord], begin: list[int], end: list[int], axes: list[int]) -> None:
    x = faithful(n, ctx, n.inputs[0], out)
    shape = ctx.per_image(n.inputs[0])
    if any(a == 0 for a in axes):
        raise _unsupported(n, "slices the batch axis")
    keep = [(b, e, a - 1) for b, e, a in zip(begin, end, axes, strict=True) if (b, e) != (0, shape[a - 1])]
    if not keep:
        keep = [(0, shape[0], 0)]
    out.append(LayerRecord("Crop", n.name, [x], [n.output],
                           {9: tuple(k[0] for k in keep), 10: tuple(k[1] for k in keep),
                            11: tuple(k[2] for k in keep)}))


def _slice_axis(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    shape = ctx.shapes[n.inputs[0]]
    a = n.attrs["axis"] % len(shape)
    b, e = slice(n.attrs["begin"], n.attrs["end"]).indices(shape[a])[:2]
    _crop(n, ctx, out, [b], [e], [a])


def _slice(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    shape = ctx.shapes[n.inputs[0]]
    a = n.attrs
    if any(s not in (None, 1) for s in a["step"]):
        raise _unsupported(n, "slice with a step (ncnn Crop takes contiguous ranges)")
    rng = [slice(b, e).indices(shape[k])[:2] for k, (b, e) in enumerate(zip(a["begin"], a["end"], strict=True))]
    axes = [k for k, (b, e) in enumerate(rng) if (b, e) != (0, shape[k])]
    _crop(n, ctx, out, [rng[k][0] for k in axes], [rng[k][1] for k in axes], axes)


def _pad(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    pads = spatial_pads(n.attrs["pad_width"])
    if n.attrs["mode"] != "constant" or pads is None:
        raise _unsupported(n, f"mode {n.attrs['mode']} pad_width {n.attrs['pad_width']} (constant padding of "
                              "H and W only)")
    x = faithful(n, ctx, n.inputs[0], out)
    out.append(LayerRecord("Padding", n.name, [x], [n.output],
                           {0: pads[0], 1: pads[1], 2: pads[2], 3: pads[3], 4: 0,
                            5: float(n.attrs["constant_value"])}))


def _sum(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    rank = len(ctx.shapes[n.inputs[0]])
    axes = sorted({a % rank for a in n.attrs["axis"]}) if n.attrs["axis"] else list(range(rank))
    if n.attrs["exclude"]:
        axes = [a for a in range(rank) if a not in axes]
    if 0 in axes:
        raise _unsupported(n, "sums over the batch axis")
    x = faithful(n, ctx, n.inputs[0], out)
    out.append(LayerRecord("Reduction", n.name, [x], [n.output],
                           {0: 0, 1: 0, 2: 1.0, 3: tuple(a - 1 for a in axes), 4: int(n.attrs["keepdims"]), 5: 1}))


def _bilinear(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    if n.attrs["mode"] not in ("size", "like") and n.attrs["scale_height"] is None:
        raise _unsupported(n, f"mode {n.attrs['mode']}")
    oh, ow = ctx.per_image(n.output)[1:]
    x = faithful(n, ctx, n.inputs[0], out)
    out.append(LayerRecord("Interp", n.name, [x], [n.output],
                           {0: 2, 3: int(oh), 4: int(ow), 6: int(n.attrs["align_corners"])}))


def _upsampling(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    if n.attrs["sample_type"] != "nearest" or len(n.inputs) != 1:
        raise _unsupported(n, f"sample_type {n.attrs['sample_type']} with {len(n.inputs)} inputs "
                              "(nearest, one input)")
    x = faithful(n, ctx, n.inputs[0], out)
    s = float(n.attrs["scale"])
    out.append(LayerRecord("Interp", n.name, [x], [n.output], {0: 1, 1: s, 2: s}))


def _adaptive(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    oh, ow = n.attrs["output_size"]
    x = faithful(n, ctx, n.inputs[0], out)
    out.append(LayerRecord("Pooling", n.name, [x], [n.output], {0: 1, 7: 1, 8: int(ow), 18: int(oh)}))


def _scalar(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    out.append(LayerRecord("BinaryOp", n.name, list(n.inputs), [n.output],
                           {0: _BINARY_SCALAR[n.op], 1: 1, 2: float(n.attrs["scalar"])}))


def _mul(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    out.append(LayerRecord("BinaryOp", n.name, list(n.inputs), [n.output], {0: 2}))


def _shuffle(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
    x = faithful(n, ctx, n.inputs[0], out)
    out.append(LayerRecord("ShuffleChannel", n.name, [x], [n.output], {0: n.attrs["group"], 1: 0}))


def _hard(kind: str) -> Callable[[Node, Ctx, list[LayerRecord]], None]:
    def lower(n: Node, ctx: Ctx, out: list[LayerRecord]) -> None:
        out.append(LayerRecord(kind, n.name, list(n.inputs), [n.output],
                               {0: float(n.attrs["alpha"]), 1: float(n.attrs["beta"])}))
    return lower


#: IR op -> ncnn lowering ``(node, ctx, layers_out)``.
LOWERINGS: dict[str, Callable[[Node, Ctx, list[LayerRecord]], None]] = {
    "Reshape": _reshape,
    "SwapAxis": _swapaxis,
    "slice_axis": _slice_axis,
    "slice": _slice,
    "Pad": _pad,
    "sum": _sum,
    "_contrib_BilinearResize2D": _bilinear,
    "UpSampling": _upsampling,
    "_contrib_AdaptiveAvgPooling2D": _adaptive,
    "elemwise_mul": _mul,
    "ShuffleChannel": _shuffle,
    "HardSigmoid": _hard("HardSigmoid"),
    "HardSwish": _hard("HardSwish"),
    **{op: _scalar for op in _BINARY_SCALAR},
}
#: ops that keep ncnn's 1-D blob of a globally pooled tensor 1-D (elementwise on it).
KEEPS_VECTOR = ("elemwise_mul", "HardSigmoid", "HardSwish", *_BINARY_SCALAR)
