"""IR -> Caffe ``NetParameter`` (``.prototxt`` + ``.caffemodel``) for ncnn's caffe2ncnn, without pycaffe.

Layer names are the IR node names, so caffe2ncnn's ncnn layers carry the names the ncnn scale table uses.
Activations whose input has no other use work in place (Caffe style; caffe2ncnn renames their tops).
Pooling: Caffe rounds output sizes up; where MXNet floors to one row/column less, a Slice drops Caffe's extra
tail window; a pooling whose windows would differ is refused.

Squeeze-excitation (as the ncnn lowering): a 1x1 convolution on a globally pooled tensor is an ``InnerProduct``
(output (N, C), a 1-D blob in ncnn, like the direct model's InnerProduct); ``broadcast_mul(x, s)`` of a 4-D
tensor by such a per-channel vector is a Caffe ``Scale`` with two bottoms and ``axis: 0`` (bottom[1] (N, C)
matches the first two axes of bottom[0]); caffe2ncnn writes it as ncnn ``Scale`` with ``0=-233`` (scale from the
second blob, one value per channel). A 4-D vector operand (N, C, 1, 1) is flattened first.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from deployq.exporters.ir.graph import Graph, Node, UnsupportedOpError
from deployq.exporters.ir.mxnet_lower import to_symbol
from deployq.exporters.ir.passes import activation_kind
from deployq.exporters.ncnn import caffe_pb2 as pb
from google.protobuf import text_format

ACTIVATION_TYPES = {"relu": "ReLU", "relu6": "ReLU6", "sigmoid": "Sigmoid", "tanh": "TanH", "leaky": "ReLU"}


def _blob(arr: np.ndarray) -> pb.BlobProto:
    b = pb.BlobProto()
    b.shape.dim.extend(int(d) for d in arr.shape)
    b.data.extend(np.asarray(arr, np.float32).reshape(-1).tolist())
    return b


def tensor_shapes(g: Graph) -> dict[str, tuple[int, ...]]:
    names = g.tensors()[1:]
    sym, _, _ = to_symbol(g, outputs=names)
    _, shapes, _ = sym.infer_shape(data=g.input_shape)
    out = dict(zip(names, (tuple(s) for s in shapes), strict=True))
    out[g.input_name] = tuple(g.input_shape)
    return out


def caffe_pool_size(size: int, k: int, s: int, p: int) -> int:
    """Caffe's pooled size: ceil, minus one if the last window starts inside the bottom padding only."""
    out = int(math.ceil((size + 2 * p - k) / s)) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


def check_pooling(node: Node, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """MXNet's output size per spatial axis where Caffe's ceil gives one more row/column that a Slice after
    the pooling drops (0 where the sizes agree); refuse a pooling Caffe would compute differently."""
    a = node.attrs
    if a["global_pool"]:
        return (0, 0)
    crop = []
    for size, k, s, p in zip(in_shape[2:], a["kernel"], a["stride"], a["pad"], strict=True):
        exact = (size + 2 * p - k) % s == 0
        mx_out = (size + 2 * p - k) // s + 1 + (0 if exact or a["pooling_convention"] == "valid" else 1)
        caffe = caffe_pool_size(size, k, s, p)
        # valid (floor): every MXNet window lies inside the padded input, where Caffe's windows are the same;
        # Caffe's one extra tail window is sliced off
        if a["pooling_convention"] == "valid" and caffe in (mx_out, mx_out + 1):
            crop.append(mx_out if caffe == mx_out + 1 else 0)
            continue
        # max pooling: equal sizes give equal windows (both clip a tail window at the edge)
        if caffe != mx_out or not (exact or a["pool_type"] == "max"):
            raise UnsupportedOpError(
                f"{node.name}: Pooling kernel {k} stride {s} pad {p} on size {size} ({a['pooling_convention']}): "
                f"MXNet gives {mx_out}, Caffe (ceil) gives {caffe} or other tail windows; "
                "Caffe cannot reproduce it")
        crop.append(0)
    if a["pool_type"] == "avg" and a["count_include_pad"] is not False and any(a["pad"]):
        # caffe2ncnn writes no avgpool_count_include_pad (ncnn's default 0): ncnn then divides by the window's
        # elements inside the image, MXNet's count_include_pad=True by the whole window
        raise UnsupportedOpError(f"{node.name}: padded average pooling with count_include_pad=True: the model "
                                 "caffe2ncnn writes excludes the padding from the average (ncnn's default)")
    return tuple(crop)


def _set_hw(param, name: str, v: tuple[int, int], repeated: bool) -> None:
    if v[0] == v[1]:
        if repeated:
            getattr(param, name).append(v[0])
        else:
            setattr(param, name, v[0])
    else:
        setattr(param, f"{name.split('_')[0]}_h", v[0])
        setattr(param, f"{name.split('_')[0]}_w", v[1])


def to_caffe(g: Graph) -> pb.NetParameter:
    """The graph (optimized; BN folded or not) as a Caffe net with weights."""
    shapes = tensor_shapes(g)
    net = pb.NetParameter(name=g.name)
    inp = net.layer.add(name=g.input_name, type="Input", top=[g.input_name])
    inp.input_param.shape.add().dim.extend(g.input_shape)
    blob_of = {g.input_name: g.input_name}
    vectors: set[str] = set()  # per-channel vectors: globally pooled tensors and what is computed from them
    rank2: set[str] = set()  # tensors that are (N, C) in Caffe (InnerProduct, Flatten outputs)

    def single_use(t: str) -> bool:
        return g.n_uses(t) == 1

    for node in g.nodes:
        xs = [blob_of[t] for t in node.inputs]
        top = node.output
        kind = activation_kind(node) if node.op in ("Activation", "clip", "LeakyReLU") else None
        on_vector = node.op != "broadcast_mul" and any(t in vectors for t in node.inputs)
        if on_vector or node.op in ("FullyConnected", "Flatten") or (node.op == "Pooling"
                                                                     and node.attrs["global_pool"]):
            vectors.add(node.output)
        if node.op in ("FullyConnected", "Flatten") or (on_vector and node.op == "Convolution"):
            rank2.add(node.output)
        elif kind is not None and node.inputs[0] in rank2:
            rank2.add(node.output)
        if node.op == "Convolution" and on_vector:
            a = node.attrs
            if not (tuple(a["kernel"]) == (1, 1) and tuple(a["stride"]) == (1, 1) and not any(a["pad"])
                    and a["num_group"] == 1):
                raise UnsupportedOpError(f"{node.name}: Caffe exporter: a {a['kernel']} convolution on a globally "
                                         "pooled tensor")
            ly = net.layer.add(name=node.name, type="InnerProduct", bottom=xs, top=[top])
            b = g.param(node, "bias")
            ly.inner_product_param.num_output = a["num_filter"]
            ly.inner_product_param.bias_term = b is not None
            w = g.param(node, "weight")
            ly.blobs.append(_blob(w.reshape(w.shape[0], -1)))
            if b is not None:
                ly.blobs.append(_blob(b))
        elif node.op == "broadcast_mul":
            xt, st = node.inputs
            if xt in vectors and st not in vectors:
                xt, st = st, xt
            c = shapes[xt][1] if len(shapes[xt]) > 1 else None
            if (st not in vectors or xt in vectors or len(shapes[xt]) != 4
                    or tuple(shapes[st][1:]) not in ((c,), (c, 1, 1))):
                raise UnsupportedOpError(f"{node.name}: Caffe exporter: broadcast_mul of {shapes[node.inputs[0]]} by "
                                         f"{shapes[node.inputs[1]]} (only a 4-D tensor by a per-channel vector, "
                                         "as in squeeze-excitation)")
            sb = blob_of[st]
            if st not in rank2:
                sb = f"{node.name}_flatten"
                net.layer.add(name=sb, type="Flatten", bottom=[blob_of[st]], top=[sb])
            ly = net.layer.add(name=node.name, type="Scale", bottom=[blob_of[xt], sb], top=[top])
            ly.scale_param.axis = 0
            ly.scale_param.bias_term = False
        elif node.op == "Convolution":
            a = node.attrs
            ly = net.layer.add(name=node.name, type="Convolution", bottom=xs, top=[top])
            cp = ly.convolution_param
            cp.num_output = a["num_filter"]
            b = g.param(node, "bias")
            cp.bias_term = b is not None
            _set_hw(cp, "kernel_size", a["kernel"], True)
            _set_hw(cp, "stride", a["stride"], True)
            _set_hw(cp, "pad", a["pad"], True)
            if tuple(a["dilate"]) != (1, 1):
                if a["dilate"][0] != a["dilate"][1]:
                    raise UnsupportedOpError(f"{node.name}: anisotropic dilation")
                cp.dilation.append(a["dilate"][0])
            if a["num_group"] != 1:
                cp.group = a["num_group"]
            ly.blobs.append(_blob(g.param(node, "weight")))
            if b is not None:
                ly.blobs.append(_blob(b))
        elif node.op == "FullyConnected":
            if not node.attrs["flatten"]:
                raise UnsupportedOpError(f"{node.name}: FullyConnected flatten=False")
            ly = net.layer.add(name=node.name, type="InnerProduct", bottom=xs, top=[top])
            b = g.param(node, "bias")
            ly.inner_product_param.num_output = node.attrs["num_hidden"]
            ly.inner_product_param.bias_term = b is not None
            w = g.param(node, "weight")
            ly.blobs.append(_blob(w.reshape(w.shape[0], -1)))
            if b is not None:
                ly.blobs.append(_blob(b))
        elif kind is not None or node.op in ("Activation", "clip", "LeakyReLU"):
            if kind is None or (node.op == "clip" and kind != "relu6"):
                raise UnsupportedOpError(f"{node.name}: Caffe exporter: unsupported activation {node.op} "
                                         f"{node.attrs}")
            if single_use(node.inputs[0]) and node.inputs[0] not in g.outputs:
                top = xs[0]
            ly = net.layer.add(name=node.name, type=ACTIVATION_TYPES[kind], bottom=xs, top=[top])
            if kind == "leaky":
                ly.relu_param.negative_slope = node.attrs["slope"]
        elif node.op == "BatchNorm":
            if single_use(node.inputs[0]) and node.inputs[0] not in g.outputs:
                top = xs[0]
            ly = net.layer.add(name=node.name, type="BatchNorm", bottom=xs, top=[top])
            ly.batch_norm_param.use_global_stats = True
            ly.batch_norm_param.eps = node.attrs["eps"]
            ly.blobs.extend([_blob(g.param(node, "moving_mean")), _blob(g.param(node, "moving_var")),
                             _blob(np.ones(1, np.float32))])
            gamma = g.param(node, "gamma")
            sc = net.layer.add(name=f"{node.name}_scale", type="Scale", bottom=[top], top=[top])
            sc.scale_param.bias_term = True
            sc.blobs.extend([_blob(np.ones_like(gamma) if node.attrs["fix_gamma"] else gamma),
                             _blob(g.param(node, "beta"))])
        elif node.op == "Pooling":
            crop = check_pooling(node, shapes[node.inputs[0]])
            a = node.attrs
            pooled = f"{top}_caffe_ceil" if any(crop) else top
            ly = net.layer.add(name=node.name, type="Pooling", bottom=xs, top=[pooled])
            for axis, keep in zip((2, 3), crop, strict=True):
                if keep:  # drop Caffe's extra last row (axis 2) / column (axis 3)
                    out = top if axis == 3 or not crop[1] else f"{top}_caffe_rows"
                    sl = net.layer.add(name=f"{node.name}_crop{axis}", type="Slice", bottom=[pooled],
                                       top=[out, f"{node.name}_crop{axis}_tail"])
                    sl.slice_param.axis = axis
                    sl.slice_param.slice_point.append(keep)
                    pooled = out
            pp = ly.pooling_param
            if a["pool_type"] not in ("max", "avg"):
                raise UnsupportedOpError(f"{node.name}: pool_type {a['pool_type']}")
            pp.pool = pb.PoolingParameter.MAX if a["pool_type"] == "max" else pb.PoolingParameter.AVE
            if a["global_pool"]:
                pp.global_pooling = True
            else:
                _set_hw(pp, "kernel_size", a["kernel"], False)
                _set_hw(pp, "stride", a["stride"], False)
                _set_hw(pp, "pad", a["pad"], False)
        elif node.op == "Flatten":
            net.layer.add(name=node.name, type="Flatten", bottom=xs, top=[top])
        elif node.op == "elemwise_add":
            ly = net.layer.add(name=node.name, type="Eltwise", bottom=xs, top=[top])
            ly.eltwise_param.operation = pb.EltwiseParameter.SUM
        elif node.op == "Concat":
            ly = net.layer.add(name=node.name, type="Concat", bottom=xs, top=[top])
            ly.concat_param.axis = node.attrs["dim"] % len(shapes[node.inputs[0]])
        elif node.op in ("softmax", "SoftmaxActivation", "SoftmaxOutput"):
            rank = len(shapes[node.inputs[0]])
            axis = node.attrs["axis"] % rank if node.op == "softmax" else 1
            ly = net.layer.add(name=node.name, type="Softmax", bottom=xs, top=[top])
            ly.softmax_param.axis = axis
        elif node.op == "Reshape" and node.inputs[0] in vectors and len(shapes[node.output]) in (2, 4) \
                and int(np.prod(shapes[node.output][2:])) == 1:
            top = xs[0]  # a per-channel vector stays one (squeeze-excitation's expand_dims): no layer
        elif node.op == "ShuffleChannel":
            ly = net.layer.add(name=node.name, type="ShuffleChannel", bottom=xs, top=[top])
            ly.shuffle_channel_param.group = node.attrs["group"]
        elif node.op == "slice_axis" and node.attrs["axis"] % len(shapes[node.inputs[0]]) == 1:
            c = shapes[node.inputs[0]][1]
            b, e = slice(node.attrs["begin"], node.attrs["end"]).indices(c)[:2]
            points = [p for p in (b, e) if 0 < p < c]
            tops = ([f"{node.name}_head"] if b > 0 else []) + [top] + ([f"{node.name}_tail"] if e < c else [])
            ly = net.layer.add(name=node.name, type="Slice", bottom=xs, top=tops)
            ly.slice_param.axis = 1
            ly.slice_param.slice_point.extend(points)
        else:
            raise UnsupportedOpError(f"{node.name}: Caffe exporter: unsupported op {node.op}")
        blob_of[node.output] = top
    return net


def prototxt_text(net: pb.NetParameter) -> str:
    """The net without weights, in protobuf text format."""
    arch = pb.NetParameter()
    arch.CopyFrom(net)
    for ly in arch.layer:
        del ly.blobs[:]
    return text_format.MessageToString(arch)


def write_caffe(g: Graph, prototxt: str | Path, caffemodel: str | Path) -> None:
    net = to_caffe(g)
    Path(prototxt).write_text(prototxt_text(net))
    Path(caffemodel).write_bytes(net.SerializeToString(deterministic=True))
