"""Activation collection: one hybridized fp32 pass that returns the inputs of every quantized Conv/Dense.

The net's symbol (``net(mx.sym.var('data'))``) is traced; for each Convolution/FullyConnected node (named by its
structural path, ``features.0``) its data input is taken from ``sym.get_internals()``; the outputs are bound into
one ``gluon.SymbolBlock`` that shares the net's parameters. A tensor consumed by several layers is computed once.

With the fused calibration operator (``deployq.native.calibops``), :meth:`ActivationTap.stats_block` builds, per
mode, a graph whose only output is ``dq_calib_stats`` over every tapped tensor (min/max, EMA clipped counts or
histograms of |x|, one float64 vector per batch), so that no activation crosses to the host. Each tensor reaches
the operator through a ``reshape(-1)``: oneDNN's reorder of a blocked-layout tensor into plain memory planned with
the graph, much cheaper than the reorder MXNet's custom-operator interface makes (a fresh allocation per call).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..naming import node_path, prefix_map, structure_fingerprint

WEIGHTED_OPS = ("Convolution", "FullyConnected")


@dataclass(frozen=True)
class TapPoint:
    key: str      # scale-file key, "<layer>:input"
    layer: str    # structural path of the consuming layer
    tensor: str   # structural name of the tensor ("data" for the graph input)
    internal: str  # name of the output in sym.get_internals()


def trace(net: gluon.HybridBlock):
    """The fp32 symbol of ``net`` with input ``data``."""
    out = net(mx.sym.var("data"))
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out


def tap_points(sym, net: gluon.Block, layers=None) -> list[TapPoint]:
    """Inputs of every Conv/Dense node (restricted to ``layers`` paths when given), in graph order."""
    nodes = json.loads(sym.tojson())["nodes"]
    pm = prefix_map(net)
    available = set(sym.get_internals().list_outputs())
    points = []
    for node in nodes:
        if node["op"] not in WEIGHTED_OPS:
            continue
        layer = node_path(node["name"], pm)
        if layers is not None and layer not in layers:
            continue
        src_i, out_i = node["inputs"][0][0], node["inputs"][0][1]
        src = nodes[src_i]
        if src["op"] == "null":
            internal, tensor = src["name"], src["name"]
        else:
            internal = f"{src['name']}_output"
            if internal not in available:
                internal = f"{src['name']}_output{out_i}"
            tensor = node_path(src["name"], pm)
        points.append(TapPoint(f"{layer}:input", layer, tensor, internal))
    return points


class ActivationTap:
    """Runs the fp32 graph and returns the tapped tensors of a batch as NDArrays (one per unique tensor), in
    MXNet's default layout."""

    def __init__(self, net: gluon.HybridBlock, layers=None):
        sym = trace(net)
        self.symbol_json = sym.tojson()
        self.fingerprint = structure_fingerprint(self.symbol_json)
        self.points = tap_points(sym, net, layers)
        if layers is not None:
            missing = sorted(set(layers) - {p.layer for p in self.points})
            if missing:
                raise ValueError(f"quantized layers not found in the traced graph: {', '.join(missing)}")
        self.internals = list(OrderedDict.fromkeys(p.internal for p in self.points))
        internals = sym.get_internals()
        # an identity per output: MXNet writes it in the default (plain NCHW) layout, not oneDNN's blocked one,
        # so the host reads it through a zero-copy view (deployq.calib.api.HostReader) instead of a reorder+copy
        outs = [mx.sym.identity(internals[i]) for i in self.internals]
        self.block = gluon.SymbolBlock(outs, mx.sym.var("data"), params=net.collect_params())
        self.block.hybridize(static_alloc=True)

        self._internal_syms = [internals[i] for i in self.internals]
        self._params = net.collect_params()
        self._stats: dict[tuple[str, int], gluon.SymbolBlock] = {}
        self._sizes: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, x: mx.nd.NDArray) -> list[mx.nd.NDArray]:
        out = self.block(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    #: per mode: (values per tensor in the stats vector given num_bins, aux values per tensor or 0 for no aux)
    STATS_LAYOUT = {"range": (lambda b: 2, 0), "clip": (lambda b: 3, 4), "hist": (lambda b: b + 1, 1)}

    def stats_block(self, mode: str, num_bins: int = 2048) -> gluon.SymbolBlock:
        """The graph ``(data[, aux]) -> dq_calib_stats(tensors..., mode)`` (needs deployq.native.calibops)."""
        key = (mode, int(num_bins))
        blk = self._stats.get(key)
        if blk is None:
            flat = [mx.sym.reshape(t, shape=(-1,)) for t in self._internal_syms]
            inputs = [mx.sym.var("data")]
            if self.STATS_LAYOUT[mode][1]:
                inputs.append(mx.sym.var("calib_aux", dtype="float64"))
            out = mx.sym.dq_calib_stats(*flat, *inputs[1:], mode=mode, num_inputs=len(flat), num_bins=int(num_bins))
            blk = self._stats[key] = gluon.SymbolBlock(out, inputs, params=self._params)
            blk.hybridize(static_alloc=True)
        return blk

    def sizes(self, shape: tuple[int, ...]) -> list[int]:
        """Number of values of every tapped tensor for an input of ``shape``."""
        n = self._sizes.get(shape)
        if n is None:
            syms = mx.sym.Group(self._internal_syms)
            _, out_shapes, _ = syms.infer_shape_partial(data=shape)
            n = self._sizes[shape] = [int(np.prod(s)) for s in out_shapes]
        return n
