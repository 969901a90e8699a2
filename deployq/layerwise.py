"""Run a deployq-quantized Gluon net as simulated: logits and the output of every quantized layer; and
min-max input (and output) ranges from fp32 activations (a small stand-in for ``deployq.calib``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import mxnet as mx
import numpy as np
from mxnet import gluon

from .api import float_mode, quant_layers, trace_symbol
from .naming import prefix_map


@contextlib.contextmanager
def no_subgraph_fusion() -> Iterator[None]:
    """Bind executors without MXNet's MKLDNN subgraph fusion, which fuses Conv+ReLU so that an internal Conv
    output would read post-activation values."""
    old = os.environ.get("MXNET_SUBGRAPH_BACKEND")
    os.environ["MXNET_SUBGRAPH_BACKEND"] = "NONE"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MXNET_SUBGRAPH_BACKEND", None)
        else:
            os.environ["MXNET_SUBGRAPH_BACKEND"] = old


def _layer_symbols(net: gluon.HybridBlock, layers: Iterable[str]) -> tuple[mx.sym.Symbol, list[str]]:
    sym = trace_symbol(net)
    internals = sym.get_internals()
    names = set(internals.list_outputs())
    pm = {path: prefix for prefix, path in prefix_map(net).items()}
    outs, found = [sym], []
    for path in layers:
        key = f"{pm.get(path, '')}fwd_output"
        if path in pm and key in names:
            outs.append(internals[key])
            found.append(path)
    return mx.sym.Group(outs), found


def run_layers(net: gluon.HybridBlock, x: np.ndarray, layers: Iterable[str] | None = None,
               batch_size: int = 250, fp32: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits, {layer path: layer output}) of ``net`` (simulated, or its fp32 graph with ``fp32=True``) for
    the quantized layers (default: all), in inference mode. A layer's output is its Conv/Dense output (BN
    folded, before the activation)."""
    layers = list(quant_layers(net) if layers is None else layers)

    def go() -> tuple[np.ndarray, dict[str, np.ndarray]]:
        net(mx.nd.array(x[:1]))
        sym, found = _layer_symbols(net, layers)
        params = {p.name: p.data() for p in net.collect_params().values()}
        args = {k: params[k] for k in sym.list_arguments() if k in params}
        aux = {k: params[k] for k in sym.list_auxiliary_states()}
        chunks: list[list[np.ndarray]] = []
        for i in range(0, len(x), batch_size):
            xb = mx.nd.array(x[i:i + batch_size])
            with no_subgraph_fusion():
                exe = sym.bind(mx.cpu(), dict(args, data=xb), aux_states=aux, grad_req="null")
            chunks.append([o.asnumpy() for o in exe.forward(is_train=False)])
        outs = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
        return outs[0], dict(zip(found, outs[1:], strict=True))

    if fp32:
        with float_mode(net):
            return go()
    return go()


def _output_points(net: gluon.HybridBlock, g) -> dict[str, tuple[object, str]]:
    """Every quantized output: name -> (the layer or block output quantizer, its tensor in the IR ``g``)."""
    from deployq.exporters.ir.qattach import output_tensor

    from .api import output_quantizers

    out: dict[str, tuple[object, str]] = {
        path: (blk, output_tensor(g, g.node(path), blk.layer_config.output_relu or blk.act is not None))
        for path, blk in quant_layers(net).items() if blk.layer_config.output is not None}
    for path, q in output_quantizers(net).items():
        out[f"{path}:output"] = (q, g.resolve(q.tensor))
    return out


def _fp32_graph(net: gluon.HybridBlock, shape: tuple[int, ...]):
    from deployq.exporters.ir.frontend import from_gluon
    from deployq.exporters.ir.passes import optimize

    return optimize(from_gluon(net, (1, *shape)))


def calibrate_minmax(net: gluon.HybridBlock, x: np.ndarray, batch_size: int = 250) -> dict[str, tuple[float, float]]:
    """Set every quantized layer's input range to the min/max of its fp32 input over ``x``, and the range of
    every quantized output (layer outputs, block outputs: the profile's ``quantize_outputs``, or ``quant_types``
    ``output``) to the min/max of that fp32 tensor; returns the input ranges."""
    from deployq.exporters.ir.mxnet_lower import run

    layers = quant_layers(net)
    g = _fp32_graph(net, x.shape[1:])
    inputs = {path: g.node(path).inputs[0] for path in layers}
    outputs = _output_points(net, g)
    acts = run(g, x, outputs=sorted(set(inputs.values()) | {t for _, t in outputs.values()}), batch_size=batch_size)
    ranges = {}
    for path, blk in layers.items():
        a = acts[inputs[path]]
        ranges[path] = (float(a.min()), float(a.max()))
        blk.set_input_range(*ranges[path])
    for blk, t in outputs.values():
        blk.set_output_range(float(acts[t].min()), float(acts[t].max()))
    return ranges


def calibrate_outputs(net: gluon.HybridBlock, x: np.ndarray, batch_size: int = 250) -> dict[str, tuple[float, float]]:
    """Set the range of every quantized output (layer outputs by layer path, block outputs as
    ``<block>:output``) to the min/max of that fp32 tensor over ``x``, for nets whose input ranges come from
    elsewhere (``deployq.calib.apply`` sets inputs only); returns them. An output range left unset is not
    applied: the simulation and the exporters then keep that tensor in float."""
    from deployq.exporters.ir.mxnet_lower import run

    g = _fp32_graph(net, x.shape[1:])
    outputs = _output_points(net, g)
    if not outputs:
        return {}
    acts = run(g, x, outputs=sorted({t for _, t in outputs.values()}), batch_size=batch_size)
    ranges = {}
    for name, (blk, t) in outputs.items():
        ranges[name] = (float(acts[t].min()), float(acts[t].max()))
        blk.set_output_range(*ranges[name])
    return ranges


def output_step(net: gluon.HybridBlock) -> float:
    """One output quantization step of the logits: the largest logit change that a one-step change of every
    input code of the last quantized layer causes, ``input_step * max_c sum_j |W_f[c, j]|`` (``input_step`` =
    threshold/qmax on a symmetric grid, (hi - lo)/(qmax - qmin) on an affine one; ``W_f`` BN-folded). An engine
    whose float summation order flips one rounding upstream stays within about this bound."""
    layers = list(quant_layers(net).values())
    if not layers:
        raise ValueError("output_step needs a deployq-quantized net")
    last = layers[-1]
    w = last.folded_weight_bias()[0]
    grid = last.layer_config.input
    qmax, qmin = (grid.qmax, grid.qmin) if grid is not None else (127, -127)
    if grid is None or grid.symmetric:
        step = last.input_threshold() / qmax
    else:
        lo, hi = last.input_range()
        step = (max(hi, 0.0) - min(lo, 0.0)) / (qmax - qmin)
    return float(step * np.abs(w.reshape(len(w), -1)).sum(1).max())
