"""IR -> plain MXNet symbol: the executor used to check passes, calibrate, simulate and write MXNet files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import mxnet as mx
import numpy as np
from deployq.exporters.ir.graph import Graph, Node

#: ``hook(tensor_name, symbol) -> symbol``: rewrites a tensor as it is produced (fake quantization).
TensorHook = Callable[[str, mx.sym.Symbol], mx.sym.Symbol]
#: ``lower_node(node, inputs, params) -> symbol or None``: replaces the default lowering of a node.
NodeHook = Callable[[Node, list[mx.sym.Symbol], dict[str, mx.sym.Symbol]], mx.sym.Symbol | None]
AUX_ROLES = ("moving_mean", "moving_var")


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def _op_symbol(n: Node, xs: list[mx.sym.Symbol], p: dict[str, mx.sym.Symbol]) -> mx.sym.Symbol:
    a, name = n.attrs, n.name
    if n.op == "Convolution":
        return mx.sym.Convolution(xs[0], p["weight"], p.get("bias"), kernel=a["kernel"], stride=a["stride"],
                                  dilate=a["dilate"], pad=a["pad"], num_filter=a["num_filter"],
                                  num_group=a["num_group"], no_bias="bias" not in p, name=name)
    if n.op == "FullyConnected":
        return mx.sym.FullyConnected(xs[0], p["weight"], p.get("bias"), num_hidden=a["num_hidden"],
                                     no_bias="bias" not in p, flatten=a["flatten"], name=name)
    if n.op == "BatchNorm":
        return mx.sym.BatchNorm(xs[0], p["gamma"], p["beta"], p["moving_mean"], p["moving_var"], eps=a["eps"],
                                fix_gamma=a["fix_gamma"], use_global_stats=a["use_global_stats"],
                                axis=a["axis"], name=name)
    if n.op == "Activation":
        return mx.sym.Activation(xs[0], act_type=a["act_type"], name=name)
    if n.op == "clip":  # integral bounds as "0"/"6" (Tengine's converter rejects "6.0")
        return mx.sym.clip(xs[0], a_min=_num(a["a_min"]), a_max=_num(a["a_max"]), name=name)
    if n.op == "LeakyReLU":
        return mx.sym.LeakyReLU(xs[0], act_type=a["act_type"], slope=a["slope"], name=name)
    if n.op == "Pooling":
        kw = {} if a["count_include_pad"] is None else {"count_include_pad": a["count_include_pad"]}
        return mx.sym.Pooling(xs[0], kernel=a["kernel"], stride=a["stride"], pad=a["pad"],
                              pool_type=a["pool_type"], global_pool=a["global_pool"],
                              pooling_convention=a["pooling_convention"], name=name, **kw)
    if n.op == "Flatten":
        return mx.sym.Flatten(xs[0], name=name)
    if n.op == "elemwise_add":
        return mx.sym.elemwise_add(*xs, name=name)
    if n.op == "broadcast_add":
        return mx.sym.broadcast_add(*xs, name=name)
    if n.op == "broadcast_mul":
        return mx.sym.broadcast_mul(*xs, name=name)
    if n.op == "Concat":
        return mx.sym.Concat(*xs, dim=a["dim"], num_args=len(xs), name=name)
    if n.op == "Dropout":
        return mx.sym.Dropout(xs[0], p=a["p"], mode=a["mode"], name=name)
    if n.op == "softmax":
        kw = {} if a["temperature"] is None else {"temperature": a["temperature"]}
        return mx.sym.softmax(xs[0], axis=a["axis"], name=name, **kw)
    if n.op == "SoftmaxActivation":
        return mx.sym.SoftmaxActivation(xs[0], mode=a["mode"], name=name)
    if n.op == "SoftmaxOutput":  # inference forward of SoftmaxOutput == instance softmax over flattened input
        mode = "channel" if a["multi_output"] else "instance"
        return mx.sym.SoftmaxActivation(xs[0], mode=mode, name=name)
    if n.op in SHAPE_AND_POINTWISE:
        return SHAPE_AND_POINTWISE[n.op](n, xs)
    raise ValueError(f"mxnet_lower: node {name}: no lowering for op {n.op}")


def _opt(v: object) -> str:
    return "None" if v is None else str(v)


def _slice(n: Node, xs: list[mx.sym.Symbol]) -> mx.sym.Symbol:
    a = n.attrs
    kw = {"step": "(" + ",".join(_opt(v) for v in a["step"]) + ",)"} if a["step"] else {}
    return mx.sym.slice(xs[0], begin="(" + ",".join(_opt(v) for v in a["begin"]) + ",)",
                        end="(" + ",".join(_opt(v) for v in a["end"]) + ",)", name=n.name, **kw)


def _bilinear(n: Node, xs: list[mx.sym.Symbol]) -> mx.sym.Symbol:
    a = n.attrs
    kw = {k: a[k] for k in ("scale_height", "scale_width") if a[k] is not None}
    return mx.sym.contrib.BilinearResize2D(xs[0], height=a["height"], width=a["width"], mode=a["mode"],
                                           align_corners=a["align_corners"], name=n.name, **kw)


def _shuffle(n: Node, xs: list[mx.sym.Symbol]) -> mx.sym.Symbol:
    g = n.attrs["group"]
    y = mx.sym.swapaxes(mx.sym.reshape(xs[0], shape=(0, -4, g, -1, -2)), dim1=1, dim2=2)
    return mx.sym.reshape(y, shape=(0, -3, -2), name=n.name)


def _hard_sigmoid(x: mx.sym.Symbol, n: Node, name: str | None = None) -> mx.sym.Symbol:
    return mx.sym.clip(x * n.attrs["alpha"] + n.attrs["beta"], a_min=0, a_max=1, name=name)


#: MXNet lowering of the shape, resize and pointwise ops (one entry per op).
SHAPE_AND_POINTWISE: dict[str, Callable[[Node, list[mx.sym.Symbol]], mx.sym.Symbol]] = {
    "Reshape": lambda n, xs: mx.sym.reshape(xs[0], shape=n.attrs["shape"], reverse=n.attrs["reverse"],
                                            name=n.name),
    "expand_dims": lambda n, xs: mx.sym.expand_dims(xs[0], axis=n.attrs["axis"], name=n.name),
    "SwapAxis": lambda n, xs: mx.sym.swapaxes(xs[0], dim1=n.attrs["dim1"], dim2=n.attrs["dim2"], name=n.name),
    "slice_axis": lambda n, xs: mx.sym.slice_axis(xs[0], axis=n.attrs["axis"], begin=n.attrs["begin"],
                                                  end=n.attrs["end"], name=n.name),
    "slice": _slice,
    "Pad": lambda n, xs: mx.sym.pad(xs[0], mode=n.attrs["mode"], pad_width=n.attrs["pad_width"],
                                    constant_value=n.attrs["constant_value"], name=n.name),
    "sum": lambda n, xs: mx.sym.sum(xs[0], axis=n.attrs["axis"] or None, keepdims=n.attrs["keepdims"],
                                    exclude=n.attrs["exclude"], name=n.name),
    "_contrib_AdaptiveAvgPooling2D": lambda n, xs: mx.sym.contrib.AdaptiveAvgPooling2D(
        xs[0], output_size=n.attrs["output_size"], name=n.name),
    "_contrib_BilinearResize2D": _bilinear,
    "UpSampling": lambda n, xs: mx.sym.UpSampling(*xs, scale=n.attrs["scale"], sample_type=n.attrs["sample_type"],
                                                  num_args=len(xs), name=n.name),
    "elemwise_mul": lambda n, xs: mx.sym.elemwise_mul(*xs, name=n.name),
    "ones_like": lambda n, xs: mx.sym.ones_like(xs[0], name=n.name),
    "_plus_scalar": lambda n, xs: mx.sym._internal._plus_scalar(xs[0], scalar=n.attrs["scalar"], name=n.name),
    "_minus_scalar": lambda n, xs: mx.sym._internal._minus_scalar(xs[0], scalar=n.attrs["scalar"], name=n.name),
    "_rminus_scalar": lambda n, xs: mx.sym._internal._rminus_scalar(xs[0], scalar=n.attrs["scalar"],
                                                                    name=n.name),
    "_mul_scalar": lambda n, xs: mx.sym._internal._mul_scalar(xs[0], scalar=n.attrs["scalar"], name=n.name),
    "_div_scalar": lambda n, xs: mx.sym._internal._div_scalar(xs[0], scalar=n.attrs["scalar"], name=n.name),
    "ShuffleChannel": _shuffle,
    "HardSigmoid": lambda n, xs: _hard_sigmoid(xs[0], n, n.name),
    "HardSwish": lambda n, xs: mx.sym.elemwise_mul(xs[0], _hard_sigmoid(xs[0], n), name=n.name),
}


def to_symbol(graph: Graph, hook: TensorHook | None = None, outputs: Iterable[str] | None = None,
              lower_node: NodeHook | None = None
              ) -> tuple[mx.sym.Symbol, dict[str, mx.nd.NDArray], dict[str, mx.nd.NDArray]]:
    """The IR as an MXNet symbol plus ``arg_params``/``aux_params`` (names = IR param keys).

    ``hook`` may rewrite each activation tensor (the input included) as it is produced; ``lower_node`` may
    replace a node's lowering; ``outputs`` selects the tensors to return (default: the graph outputs).
    """
    hook = hook or (lambda _t, s: s)
    syms: dict[str, mx.sym.Symbol] = {graph.input_name: hook(graph.input_name, mx.sym.var(graph.input_name))}
    pvars = {k: mx.sym.var(k) for k in graph.params}
    for n in graph.nodes:
        xs, ps = [syms[t] for t in n.inputs], {r: pvars[k] for r, k in n.params.items()}
        s = lower_node(n, xs, ps) if lower_node else None
        s = _op_symbol(n, xs, ps) if s is None else s
        syms[n.output] = hook(n.output, s)
    outs = [syms[t] for t in (outputs or graph.outputs)]
    sym = outs[0] if len(outs) == 1 else mx.sym.Group(outs)
    aux_keys = {k for n in graph.nodes for r, k in n.params.items() if r in AUX_ROLES}
    args = {k: mx.nd.array(v) for k, v in graph.params.items() if k not in aux_keys}
    aux = {k: mx.nd.array(v) for k, v in graph.params.items() if k in aux_keys}
    return sym, args, aux


@contextlib.contextmanager
def _no_subgraph_fusion() -> Iterator[None]:
    """Bind without MKLDNN's subgraph fusion: it fails on graphs that output internal tensors and it would
    change the numerics of the graph we check (conv+BN+ReLU fused in MKLDNN)."""
    old = os.environ.get("MXNET_SUBGRAPH_BACKEND")
    os.environ["MXNET_SUBGRAPH_BACKEND"] = "NONE"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MXNET_SUBGRAPH_BACKEND"]
        else:
            os.environ["MXNET_SUBGRAPH_BACKEND"] = old


def run_symbol(sym: mx.sym.Symbol, args: dict[str, mx.nd.NDArray], aux: dict[str, mx.nd.NDArray],
               x: np.ndarray, batch_size: int = 250) -> list[np.ndarray]:
    """Run ``sym`` (inference) on NumPy images ``x`` in batches; one array per symbol output."""
    outs: list[list[np.ndarray]] = []
    exe = None
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if exe is None or exe.arg_dict["data"].shape != xb.shape:
            feed = dict(args, data=mx.nd.array(xb))
            with _no_subgraph_fusion():
                exe = sym.bind(mx.cpu(), feed, aux_states=aux, grad_req="null")
        else:
            exe.arg_dict["data"][:] = xb
        res = exe.forward(is_train=False)
        outs.append([r.asnumpy() for r in res])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def run(graph: Graph, x: np.ndarray, outputs: Iterable[str] | None = None, hook: TensorHook | None = None,
        batch_size: int = 250, lower_node: NodeHook | None = None) -> dict[str, np.ndarray]:
    """Run the graph on NumPy ``x``; ``{tensor: array}`` for ``outputs`` (default: the graph outputs)."""
    names = list(outputs or graph.outputs)
    sym, args, aux = to_symbol(graph, hook, names, lower_node)
    return dict(zip(names, run_symbol(sym, args, aux, np.asarray(x, np.float32), batch_size), strict=True))


def tensor_shapes(graph: Graph, batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every activation tensor for the graph's input shape (batch size optionally replaced)."""
    names = graph.tensors()
    shape = graph.input_shape if batch is None else (batch,) + tuple(graph.input_shape[1:])
    sym, _, _ = to_symbol(graph, outputs=names)
    _, out_shapes, _ = sym.infer_shape(**{graph.input_name: shape})
    return dict(zip(names, (tuple(s) for s in out_shapes), strict=True))
