"""IR ops that Tengine's MXNet converter lacks (or maps to an op without an int8 kernel), rewritten as ops Tengine
runs in int8 (``tengine-int8.md`` §2.4, §5). One function per case, one entry in :data:`REWRITES`.

What Tengine offers, from its sources (``tools/convert_tool/mxnet/mxnet2tengine.cpp`` = the converter's op map,
``source/device/cpu/op/*`` = the kernels):

* ``broadcast_mul`` -> BroadMul, whose kernel is fp32 only (``broadmul/broadmul_ref.c``); ``elemwise_mul`` ->
  Eltwise PROD, int8 (``eltwise/eltwise_ref.c``: dequantize, multiply in float, ``round(v / s_out)``). An SE
  block's per-channel scale on a square H x W map is written as nearest ``UpSampling`` (-> Interp, int8 in
  ``interp/interp_ref.c``: ``round(q * s_in / s_out)``) to H x W, then ``elemwise_mul``.
* ``broadcast_add`` is not in the converter's map; on equal shapes it is ``elemwise_add``.
* channel shuffle: the converter's SwapAxis kernel has no int8 path (``swap_axis/swap_axis_ref.c``: fp32, uint8),
  and its ``transpose`` -> Permute reaches only the 3-D order (1, 0, 2), which would need a batch-mixing reshape.
  ShuffleChannel is written as a 1x1 convolution with a permutation matrix (one weight 1 per output channel), a
  channel ``slice_axis`` (Slice is not in the converter's map) as a 1x1 selection convolution; a slice of a shuffle
  reads the shuffle's input directly.
* HardSwish / HardSigmoid: Tengine's hardswish kernel has no int8 path (``hardswish/``: fp32, uint8), the
  converter has neither, and its Eltwise with a scalar (``_plus_scalar`` ...) reads the fp32 constant as int8.
  ``HardSigmoid(x) = relu6(6a x + 6b) / 6``: a 1x1 depthwise conv (weight 6a, bias 6b) with ReLU6 fused, then a
  1x1 depthwise conv with weight 1/6; ``HardSwish(x) = x * HardSigmoid(x)`` adds an ``elemwise_mul``.
* average pooling with ``count_include_pad`` (MXNet's default): the converter resets the flag
  (``load_pooling``: ``caffe_flavor = 0``), so the window is written as a depthwise conv with weights 1/(kh kw)
  (zero padding counted, as MXNet does).
* resnest's split attention (radix 2): the sums over the radix view ``Reshape(0, R, C, H, W)`` as 1x1 convs with
  identity blocks, the radix softmax as ``sigmoid(a_r - a_(1-r))`` (a 1x1 +-1 conv, Tengine's int8 Sigmoid), the
  product of the radix views as a 4-D broadcast_mul (then as above).
* ``Pad`` (zero, spatial) followed by a spatial ``slice`` back to the input size (nasnet's shift by a pixel): a
  depthwise conv with a one-hot kernel; ``Pad`` + pooling + ``slice`` that drops exactly the windows touching the
  explicit zeros (nasnet's MaxPoolPad / AvgPoolPad): the pooling alone, in the ceil ("full") convention; any other
  zero spatial ``Pad`` or step-1 spatial ``slice``: a depthwise conv with a one-hot kernel (pads / no pads). Neither
  op is in the converter's map.

The new convolutions carry ``attrs['lowered_from']`` (the op they replace); the last node keeps the replaced
node's name, so downstream tensors keep theirs. Run :func:`passes.mark_fusable_activations` afterwards.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from deployq.exporters.ir.graph import Graph, Node
from deployq.exporters.ir.mxnet_lower import tensor_shapes
from deployq.exporters.ir.normalize.pad import spatial_pads

Shapes = dict[str, tuple[int, ...]]

#: why an op left in the graph cannot be written for Tengine int8 (the refusal names it)
LIMITS = {
    "broadcast_mul": "Tengine's converter maps broadcast_mul to BroadMul, which has no int8 kernel "
                     "(device/cpu/op/broadmul/broadmul_ref.c: fp32 only); deployq writes a per-channel (N,C,1,1) "
                     "factor on a square map as UpSampling + elemwise_mul, and equal shapes as elemwise_mul",
    "broadcast_add": "not in Tengine's MXNet converter (tools/convert_tool/mxnet/mxnet2tengine.cpp); deployq "
                     "writes equal shapes as elemwise_add",
    "_contrib_BilinearResize2D": "not in Tengine's MXNet converter; its UpSampling -> Interp path offers nearest "
                                 "and half-pixel bilinear only (interp resize_type 1/2), not align_corners=True",
    "Pad": "not in Tengine's MXNet converter; deployq writes a zero Pad of H and W only (as conv pads or a "
           "depthwise one-hot conv), not other modes, values or axes",
    "slice": "not in Tengine's MXNet converter (its Slice op is unreachable from MXNet); deployq writes a step-1 "
             "slice of H and W only (a depthwise one-hot conv)",
    "slice_axis": "not in Tengine's MXNet converter; deployq writes a channel slice (axis 1) of a 4-D tensor as a "
                  "1x1 selection convolution",
    "SwapAxis": "Tengine's SwapAxis kernel has no int8 path (device/cpu/op/swap_axis/swap_axis_ref.c: fp32, uint8)",
    "sum": "not in Tengine's MXNet converter",
    "softmax": "softmax along an inner axis: Tengine's MXNet converter has only SoftmaxActivation/SoftmaxOutput "
               "(channel / instance softmax)",
    "_plus_scalar": "Tengine's Eltwise with a scalar constant reads the fp32 constant as int8 in its int8 kernel "
                    "(device/cpu/op/eltwise/eltwise_ref.c)",
    "HardSwish": "only on 4-D tensors (written as 1x1 depthwise convs + elemwise_mul)",
    "HardSigmoid": "only on 4-D tensors (written as 1x1 depthwise convs)",
    "ShuffleChannel": "only on 4-D tensors (written as a 1x1 permutation convolution)",
}
for _op in ("_minus_scalar", "_rminus_scalar", "_mul_scalar", "_div_scalar"):
    LIMITS[_op] = LIMITS["_plus_scalar"]


def _insert_before(g: Graph, anchor: Node, *new: Node) -> None:
    i = g.nodes.index(anchor)
    g.nodes[i:i] = list(new)


def _conv(g: Graph, n: Node, name: str, x: str, w: np.ndarray, b: np.ndarray | None = None,
          stride: tuple[int, int] = (1, 1), pad: tuple[int, int] = (0, 0), groups: int = 1) -> Node:
    """A Convolution node ``name`` on ``x`` with weights ``w`` (O, I/groups, kh, kw); ``n`` = the replaced node.
    When ``name`` is ``n.name``, ``n`` itself becomes the conv (it keeps its place and output tensor)."""
    wkey = f"{name}.lw_weight"
    g.params[wkey] = np.asarray(w, np.float32)
    params = {"weight": wkey}
    if b is not None:
        g.params[f"{name}.lw_bias"] = np.asarray(b, np.float32)
        params["bias"] = f"{name}.lw_bias"
    attrs = {"kernel": tuple(w.shape[2:]), "stride": stride, "dilate": (1, 1), "pad": pad,
             "num_filter": int(w.shape[0]), "num_group": groups, "no_bias": b is None, "layout": "None",
             "lowered_from": n.op}
    if name == n.name:
        n.op, n.inputs, n.attrs, n.params = "Convolution", [x], attrs, params
        return n
    conv = Node("Convolution", name, [x], [name], attrs, params)
    _insert_before(g, n, conv)
    return conv


def _one_hot_conv(g: Graph, n: Node, x: str, rows: np.ndarray, channels: int) -> None:
    """``n`` -> 1x1 conv whose output channel k copies input channel ``rows[k]``."""
    w = np.zeros((len(rows), channels, 1, 1), np.float32)
    w[np.arange(len(rows)), rows, 0, 0] = 1.0
    _conv(g, n, n.name, x, w)


def shuffle_permutation(channels: int, group: int) -> np.ndarray:
    """Input channel of each output channel of MXNet's channel shuffle (reshape (g, C/g), swap, reshape)."""
    return np.arange(channels).reshape(group, channels // group).T.reshape(-1)


def channel_shuffle(g: Graph, n: Node, shapes: Shapes) -> bool:
    if len(shapes[n.inputs[0]]) != 4:
        return False
    c = shapes[n.inputs[0]][1]
    _one_hot_conv(g, n, n.inputs[0], shuffle_permutation(c, n.attrs["group"]), c)
    return True


def channel_slice(g: Graph, n: Node, shapes: Shapes) -> bool:
    """``slice_axis(axis=1)`` of a 4-D tensor; of a ShuffleChannel: read the shuffle's input, permuted rows."""
    x, a = n.inputs[0], n.attrs
    if len(shapes[x]) != 4 or a["axis"] not in (1, -3):
        return False
    c = shapes[x][1]
    rows = np.arange(c)[slice(a["begin"], a["end"])]
    src = g.producer(x)
    if src is not None and src.op == "ShuffleChannel":
        rows = shuffle_permutation(c, src.attrs["group"])[rows]
        x = src.inputs[0]
    _one_hot_conv(g, n, x, rows, c)
    if src is not None and src.op == "ShuffleChannel" and g.n_uses(src.output) == 0:
        g.remove(src)
    return True


def _per_channel_conv(g: Graph, n: Node, name: str, x: str, c: int, w: float, b: float | None) -> Node:
    return _conv(g, n, name, x, np.full((c, 1, 1, 1), w, np.float32),
                 None if b is None else np.full(c, b, np.float32), groups=c)


def hard_sigmoid(g: Graph, n: Node, shapes: Shapes) -> bool:
    """``clip(a x + b, 0, 1)`` = ``relu6(6a x + 6b) / 6``: conv (6a, 6b) + clip(0, 6) + conv (1/6); HardSwish
    multiplies ``x`` by it (``elemwise_mul`` named like the node)."""
    x = n.inputs[0]
    if len(shapes[x]) != 4:
        return False
    c, alpha, beta = shapes[x][1], n.attrs["alpha"], n.attrs["beta"]
    lin = _per_channel_conv(g, n, f"{n.name}_lin", x, c, 6 * alpha, 6 * beta)
    relu6 = Node("clip", f"{n.name}_relu6", [lin.output], [f"{n.name}_relu6"], {"a_min": 0.0, "a_max": 6.0})
    _insert_before(g, n, relu6)
    if n.op == "HardSigmoid":
        _per_channel_conv(g, n, n.name, relu6.output, c, 1 / 6, None)
        return True
    gate = _per_channel_conv(g, n, f"{n.name}_gate", relu6.output, c, 1 / 6, None)
    n.op, n.inputs, n.attrs = "elemwise_mul", [x, gate.output], {}
    return True


def broadcast_binary(g: Graph, n: Node, shapes: Shapes) -> bool:
    """Equal shapes -> ``elemwise_*``; ``broadcast_mul`` of (N,C,H,W) by (N,C,1,1), H == W: nearest UpSampling of
    the factor to H x W (``<name>_up``), then ``elemwise_mul``."""
    elem = {"broadcast_mul": "elemwise_mul", "broadcast_add": "elemwise_add"}[n.op]
    sa, sb = (shapes[t] for t in n.inputs)
    if sa == sb:
        n.op, n.attrs = elem, {}
        return True
    if n.op != "broadcast_mul" or len(sa) != 4 or len(sb) != 4:
        return False
    big, small = (0, 1) if sb[2:] == (1, 1) else (1, 0)
    sbig, ssmall = (sa, sb) if big == 0 else (sb, sa)
    h, w = sbig[2:]
    if ssmall != (sbig[0], sbig[1], 1, 1) or h != w:
        return False
    up = Node("UpSampling", f"{n.name}_up", [n.inputs[small]], [f"{n.name}_up"],
              {"scale": int(h), "sample_type": "nearest", "num_args": 1, "multi_input_mode": "concat"})
    _insert_before(g, n, up)
    n.op, n.inputs, n.attrs = elem, [n.inputs[big], up.output], {}
    return True


def counted_pad_avg_pool(g: Graph, n: Node, shapes: Shapes) -> bool:
    """Padded average pooling that counts the pads (MXNet's default, valid convention): a depthwise conv with
    weights ``1 / (kh * kw)``, same kernel, stride and pads."""
    a = n.attrs
    counted = a["pool_type"] == "avg" and not a["global_pool"] and any(a["pad"]) \
        and a["count_include_pad"] in (None, True) and a["pooling_convention"] == "valid"
    if not counted or len(shapes[n.inputs[0]]) != 4 or len(a["kernel"]) != 2:
        return False
    c, (kh, kw) = shapes[n.inputs[0]][1], a["kernel"]
    _conv(g, n, n.name, n.inputs[0], np.full((c, 1, kh, kw), 1.0 / (kh * kw), np.float32),
          stride=tuple(a["stride"]), pad=tuple(a["pad"]), groups=c)
    return True


def pad_slice_shift(g: Graph, n: Node, shapes: Shapes) -> bool:
    """A zero spatial ``Pad`` whose only consumer is a spatial ``slice`` back to the input size (a shift by
    (dy, dx) with zero fill): the slice becomes a depthwise conv, kernel (2|dy|+1, 2|dx|+1), one weight 1."""
    pads = spatial_pads(n.attrs["pad_width"])
    if pads is None or n.attrs["mode"] != "constant" or n.attrs["constant_value"] != 0.0 or g.n_uses(n.output) != 1:
        return False
    cons = g.consumers(n.output)
    s, x = cons[0] if cons else None, n.inputs[0]
    if s is None or s.op != "slice" or len(shapes[x]) != 4 or shapes[s.output] != shapes[x]:
        return False
    if any(v not in (None, 1) for v in s.attrs["step"]):
        return False
    begin = tuple(b or 0 for b in s.attrs["begin"]) + (0,) * (4 - len(s.attrs["begin"]))
    if begin[:2] != (0, 0):
        return False
    dy, dx = begin[2] - pads[0], begin[3] - pads[2]
    c, ph, pw = shapes[x][1], abs(dy), abs(dx)
    w = np.zeros((c, 1, 2 * ph + 1, 2 * pw + 1), np.float32)
    w[:, 0, ph + dy, pw + dx] = 1.0
    _conv(g, s, s.name, x, w, pad=(ph, pw), groups=c)
    g.remove(n)
    return True


def pad_pool_slice(g: Graph, n: Node, shapes: Shapes) -> bool:
    """nasnet's MaxPoolPad/AvgPoolPad: zero ``Pad`` at the top/left (t, l), pooling (kernel k >= stride s, pads p),
    ``slice`` dropping the first c rows/columns with ``c * s == p + t``: the dropped windows are the only ones that
    see the explicit zeros, so this is the pooling on the unpadded input with pad 0, ``pooling_convention`` full
    (Tengine's caffe flavour; -inf / uncounted beyond the input, as MXNet's pool padding). Average pooling only with
    ``count_include_pad=False``. The slice node becomes the pooling (it keeps its name)."""
    pool = g.producer(n.inputs[0])
    pad = g.producer(pool.inputs[0]) if pool is not None and pool.op == "Pooling" else None
    if pad is None or pad.op != "Pad" or g.n_uses(pool.output) != 1 or g.n_uses(pad.output) != 1:
        return False
    pads, a = spatial_pads(pad.attrs["pad_width"]), pool.attrs
    if pads is None or pads[1] or pads[3] or pad.attrs["mode"] != "constant" or pad.attrs["constant_value"] != 0:
        return False
    if a["global_pool"] or a["pooling_convention"] != "valid" or len(a["kernel"]) != 2 or \
            (a["pool_type"] == "avg" and a["count_include_pad"] is not False) or a["pool_type"] not in ("max", "avg"):
        return False
    begin = tuple(b or 0 for b in n.attrs["begin"]) + (0,) * (4 - len(n.attrs["begin"]))
    if begin[:2] != (0, 0) or any(e is not None for e in n.attrs["end"]) or \
            any(v not in (None, 1) for v in n.attrs["step"]):
        return False
    x = pad.inputs[0]
    for c, k, st, p, t, size, out in zip(begin[2:], a["kernel"], a["stride"], a["pad"], (pads[0], pads[2]),
                                         shapes[x][2:], shapes[n.output][2:], strict=True):
        if c * st != p + t or k < st or -(-(size - k) // st) + 1 != out:
            return False
    n.op, n.inputs = "Pooling", [x]
    n.attrs = {**a, "pad": (0, 0), "pooling_convention": "full"}
    g.remove(pool)
    g.remove(pad)
    return True


def _one_hot_window(g: Graph, n: Node, x: str, c: int, kernel: tuple[int, int], at: tuple[int, int],
                    pad: tuple[int, int]) -> None:
    w = np.zeros((c, 1, *kernel), np.float32)
    w[:, 0, at[0], at[1]] = 1.0
    _conv(g, n, n.name, x, w, pad=pad, groups=c)


def pad_as_conv(g: Graph, n: Node, shapes: Shapes) -> bool:
    """Any zero spatial ``Pad`` (t, b, l, r) of a 4-D tensor: a depthwise conv with symmetric pads P = max(t, b),
    kernel 2P - t - b + 1 and one weight 1 at P - t (likewise along W)."""
    pads, x = spatial_pads(n.attrs["pad_width"]), n.inputs[0]
    if pads is None or n.attrs["mode"] != "constant" or n.attrs["constant_value"] != 0.0 or len(shapes[x]) != 4:
        return False
    (t, b), (lft, r) = pads[:2], pads[2:]
    ph, pw = max(t, b), max(lft, r)
    _one_hot_window(g, n, x, shapes[x][1], (2 * ph - t - b + 1, 2 * pw - lft - r + 1), (ph - t, pw - lft), (ph, pw))
    return True


def slice_as_conv(g: Graph, n: Node, shapes: Shapes) -> bool:
    """A spatial ``slice`` (step 1, batch and channels whole) of a 4-D tensor, rows [c0, H - c1): a depthwise conv
    without pads, kernel c0 + c1 + 1, one weight 1 at c0 (likewise along W)."""
    x = n.inputs[0]
    if len(shapes[x]) != 4 or any(v not in (None, 1) for v in n.attrs["step"]):
        return False
    h, w = shapes[x][2:]
    begin = tuple(n.attrs["begin"]) + (None,) * (4 - len(n.attrs["begin"]))
    end = tuple(n.attrs["end"]) + (None,) * (4 - len(n.attrs["end"]))
    c, full = shapes[x][1], [range(shapes[x][0]), range(shapes[x][1])]
    if any(range(*slice(b, e).indices(len(r))) != r for b, e, r in zip(begin[:2], end[:2], full, strict=True)):
        return False
    (h0, h1, _), (w0, w1, _) = slice(begin[2], end[2]).indices(h), slice(begin[3], end[3]).indices(w)
    if h1 <= h0 or w1 <= w0:
        return False
    _one_hot_window(g, n, x, c, (h0 + h - h1 + 1, w0 + w - w1 + 1), (h0, w0), (0, 0))
    return True


def _radix_split(g: Graph, t: str, shapes: Shapes) -> tuple[str, int, int] | None:
    """(4-D input, R, C) when tensor ``t`` is ``Reshape(0, R, C, ...)`` of a 4-D (N, R*C, ...) tensor (split
    attention's view of its channels as radix x channels)."""
    rs = g.producer(t)
    if rs is None or rs.op != "Reshape" or len(shapes[t]) != 5:
        return None
    x = rs.inputs[0]
    (_, r, c, *rest), xs = shapes[t], shapes[x]
    return (x, r, c) if len(xs) == 4 and xs[1] == r * c and tuple(xs[2:]) == tuple(rest) else None


def radix_sum(g: Graph, n: Node, shapes: Shapes) -> bool:
    """``sum(axis=1)`` over the radix of ``Reshape(0, R, C, H, W)`` (resnest): a 1x1 conv with R identity blocks
    on the 4-D input."""
    if tuple(n.attrs["axis"]) != (1,) or n.attrs["keepdims"] or n.attrs["exclude"]:
        return False
    split = _radix_split(g, n.inputs[0], shapes)
    if split is None:
        return False
    x, r, c = split
    w = np.zeros((c, r * c, 1, 1), np.float32)
    for k in range(r):
        w[np.arange(c), k * c + np.arange(c), 0, 0] = 1.0
    _conv(g, n, n.name, x, w)
    return True


def radix_broadcast_mul(g: Graph, n: Node, shapes: Shapes) -> bool:
    """``broadcast_mul`` of two radix views ``Reshape(0, R, C, ...)``: the product of the 4-D tensors
    (``<name>_4d``, rewritten like any broadcast_mul), viewed again as (N, R, C, H, W) by the node."""
    splits = [_radix_split(g, t, shapes) for t in n.inputs]
    if any(s is None for s in splits) or len({s[1:] for s in splits}) != 1:
        return False
    mul = Node("broadcast_mul", f"{n.name}_4d", [s[0] for s in splits], [f"{n.name}_4d"], {})
    _insert_before(g, n, mul)
    n.op, n.inputs = "Reshape", [mul.output]
    n.attrs = {"shape": (0, *shapes[n.output][1:]), "reverse": False}
    return True


def radix_softmax(g: Graph, n: Node, shapes: Shapes) -> bool:
    """resnest's radix softmax of 2: ``softmax(axis=1)`` of ``SwapAxis(1, 2)`` of ``Reshape(0, K, 2, C')`` of a 4-D
    (N, 2KC', 1, 1) tensor ``a`` is ``sigmoid(a_r - a_(1-r))``: a 1x1 conv with +1/-1 weights (placing each value
    in the radix-major order ``r * KC' + k * C' + c'`` that the following reshape reads), then a sigmoid."""
    sw = g.producer(n.inputs[0])
    rs = g.producer(sw.inputs[0]) if sw is not None and sw.op == "SwapAxis" else None
    if n.attrs["axis"] != 1 or n.attrs["temperature"] not in (None, 1.0) or rs is None or rs.op != "Reshape":
        return False
    if sorted((sw.attrs["dim1"], sw.attrs["dim2"])) != [1, 2] or len(shapes[rs.output]) != 4:
        return False
    a = rs.inputs[0]
    _, card, radix, cp = shapes[rs.output]
    if radix != 2 or shapes[a] != (shapes[a][0], card * radix * cp, 1, 1):
        return False
    total = card * radix * cp
    k, r, c = np.meshgrid(np.arange(card), np.arange(radix), np.arange(cp), indexing="ij")
    src = (k * radix * cp + r * cp + c).reshape(-1)            # a's index of (k, r, c')
    dst = (r * card * cp + k * cp + c).reshape(-1)             # the output's (radix-major) index
    other = (k * radix * cp + (1 - r) * cp + c).reshape(-1)
    w = np.zeros((total, total, 1, 1), np.float32)
    w[dst, src, 0, 0], w[dst, other, 0, 0] = 1.0, -1.0
    diff = _conv(g, n, f"{n.name}_diff", a, w)
    n.op, n.inputs, n.attrs = "Activation", [diff.output], {"act_type": "sigmoid"}
    return True


def _drop_unused(g: Graph) -> None:
    """Remove nodes whose outputs nothing reads any more (the radix views of a rewritten split attention)."""
    while dead := [n for n in g.nodes if all(g.n_uses(t) == 0 for t in n.outputs)]:
        for n in dead:
            g.remove(n)


def first_of(*fns: Rewrite) -> Rewrite:
    """The first of ``fns`` that rewrites the node."""
    def rewrite(g: Graph, n: Node, shapes: Shapes) -> bool:
        return any(fn(g, n, shapes) for fn in fns)

    rewrite.__doc__ = " / ".join(fn.__name__ for fn in fns)
    return rewrite


Rewrite = Callable[[Graph, Node, Shapes], bool]
#: (op, rewrite) in order (returns False and leaves the node when the case is not covered: check_supported
#: refuses it); a slice of a shuffle, Pad + pooling + slice and Pad + slice are matched before the general forms
REWRITES: tuple[tuple[str, Rewrite], ...] = (
    ("slice_axis", channel_slice),
    ("ShuffleChannel", channel_shuffle),
    ("HardSigmoid", hard_sigmoid),
    ("HardSwish", hard_sigmoid),
    ("softmax", radix_softmax),
    ("broadcast_mul", radix_broadcast_mul),
    ("sum", radix_sum),
    ("broadcast_mul", broadcast_binary),
    ("broadcast_add", broadcast_binary),
    ("Pooling", counted_pad_avg_pool),
    ("slice", pad_pool_slice),
    ("Pad", first_of(pad_slice_shift, pad_as_conv)),
    ("slice", slice_as_conv),
)


def tengine_forms(g: Graph) -> Graph:
    """Apply :data:`REWRITES` (in its order) to every matching node."""
    if not any(n.op in dict(REWRITES) for n in g.nodes):
        return g
    g = g.copy()
    for op, fn in REWRITES:
        todo = [n.name for n in g.nodes if n.op == op]
        if not todo:
            continue
        shapes = tensor_shapes(g)
        for name in todo:
            n = next((m for m in g.nodes if m.name == name and m.op == op), None)
            if n is not None:
                fn(g, n, shapes)
    _drop_unused(g)
    return g
