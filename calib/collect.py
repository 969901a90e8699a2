"""Activation collection: one hybridized fp32 pass that returns the inputs of every quantized Conv/Dense.

The net's symbol (``net(mx.sym.var('data'))``) is traced; for each Convolution/FullyConnected node (named by its
structural path, ``features.0``) its data input is taken from ``sym.get_internals()``; the outputs are bound into
one ``gluon.SymbolBlock`` that shares the net's parameters. A tensor consumed by several layers is computed once.

With the fused calibration operator (``deployq.native.calibops``), :meth:`ActivationTap.stats_block` builds, per
mode, a graph whose only output is ``dq_calib_stats`` over every tapped tensor (min/max, EMA clipped counts or
histograms of |x|, one float64 vector per batch), so that no activation crosses to the host. Each tensor reaches
the operator through a ``reshape(-1)``: oneDNN's reorder of a blocked-layout tensor into plain memory planned with
the graph, much cheaper than the reorder MXNet's custom-operator interface makes (a fresh allocation per call).

Faster still, :meth:`ActivationTap.batch_stats` runs a graph whose outputs are the tapped tensors themselves and
reads them where oneDNN left them (``deployq.native.rawstats``: no reorder at all; the statistics do not depend on
the element order). The first batch of every mode and input shape is computed both ways and compared exactly;
on any difference, or a tensor that cannot be read in place, the tap uses the in-graph operator from then on.

Every graph of the tap is partitioned with oneDNN's subgraph backend (``get_backend_symbol('MKLDNN')``) where
MXNet has it: Convolution + BatchNorm (+ add) + ReLU run as one operator with BN folded into the weights, as ncnn
runs the deployed net (the profile folds BN first). The tapped tensors then differ from the plain graph's by float
rounding only; :meth:`ActivationTap.check_fusion` compares the two on the first images the tap sees (max
difference within ``FUSION_RTOL`` of each tensor's max |x|), and the tap uses the plain graph from then on if they
disagree. ``fuse=False`` reads the plain graph.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import mxnet as mx
import numpy as np
from mxnet import gluon

from ..naming import node_path, prefix_map, structure_fingerprint

WEIGHTED_OPS = ("Convolution", "FullyConnected")
#: largest accepted difference between the fused and the plain graph's tapped tensors, relative to max |x|
FUSION_RTOL = 1e-4
#: images of the first batch on which the fused graph is checked against the plain one
FUSION_CHECK_IMAGES = 8


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


def fused_outputs(syms: list, inputs: set[str]) -> list | None:
    """``syms`` (outputs of one graph; those named in ``inputs`` are graph inputs, kept as they are) from the graph
    partitioned by oneDNN's subgraph backend (Conv + BN + ReLU (+ add) fused, BN folded), or None where MXNet has
    no oneDNN or the partitioning fails."""
    if not mx.runtime.Features().is_enabled("MKLDNN"):
        return None
    outs = [s for s in syms if s.name not in inputs]
    if not outs:
        return None
    try:
        g = mx.sym.Group(outs).get_backend_symbol("MKLDNN")
        parts = iter([g[j] for j in range(len(outs))])
        fused = [s if s.name in inputs else next(parts) for s in syms]
    except mx.base.MXNetError:
        return None
    return fused


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

    def __init__(self, net: gluon.HybridBlock, layers=None, fuse: bool = True):
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
        self._params = net.collect_params()
        self._inputs = set(self.internals) & set(sym.list_inputs())  # tapped graph inputs ("data")
        self._plain_syms = [internals[i] for i in self.internals]
        fused = fused_outputs(self._plain_syms, self._inputs) if fuse else None
        #: whether the tapped tensors come from the oneDNN-fused graph (BN folded); None: not checked yet
        self.fused: bool | None = None if fused is not None else False
        self._internal_syms = fused or self._plain_syms
        self.block = self._host_block(self._internal_syms)
        self._stats: dict[tuple[str, int], gluon.SymbolBlock] = {}
        self._sizes: dict[tuple[int, ...], list[int]] = {}
        self._size_arrays: dict[tuple[int, ...], np.ndarray] = {}
        #: the tapped tensors as outputs, written into kept buffers (False: no graph, every tensor is the input)
        self._raw: mx.nd.CachedOp | bool | None = None
        self._raw_args: list | None = None  # its parameter arrays, read once per calibration (begin())
        self._raw_out: dict[tuple[int, ...], list[mx.nd.NDArray]] = {}  # its outputs per input shape
        self._raw_result: dict[int, np.ndarray] = {}  # the statistics vector per length
        self._meanwhile = None  # accumulate()'s host work, run once the batch's graph is launched
        self.raw_ok: bool | None = None  # None: not tried yet; False: in-place reading refused or disagreed
        self._raw_checked: set[tuple[str, int, tuple[int, ...]]] = set()

    def _host_block(self, syms: list) -> gluon.SymbolBlock:
        # an identity per output: MXNet writes it in the default (plain NCHW) layout, not oneDNN's blocked one,
        # so the host reads it through a zero-copy view (deployq.calib.api.HostReader) instead of a reorder+copy
        blk = gluon.SymbolBlock([mx.sym.identity(s) for s in syms], mx.sym.var("data"), params=self._params)
        blk.hybridize(static_alloc=True)
        return blk

    def __call__(self, x: mx.nd.NDArray) -> list[mx.nd.NDArray]:
        out = self.block(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def check_fusion(self, x: mx.nd.NDArray) -> bool:
        """Once per tap, on the first ``FUSION_CHECK_IMAGES`` images of ``x``: do the fused graph's tapped tensors
        agree with the plain graph's (max difference <= ``FUSION_RTOL`` x max |x| per tensor)? If not, a warning
        names the first tensor that differs and the tap reads the plain graph from then on. Returns ``fused``."""
        if self.fused is not None:
            return self.fused
        xs = x[:FUSION_CHECK_IMAGES]
        plain = self._host_block(self._plain_syms)
        ref = plain(xs)
        ref = list(ref) if isinstance(ref, (list, tuple)) else [ref]
        for name, f, p in zip(self.internals, self(xs), ref, strict=True):
            f, p = f.asnumpy(), p.asnumpy()
            if not np.isfinite(p).all():  # bad activations: calibrate() names them
                continue
            scale = float(np.abs(p).max()) if p.size else 0.0
            diff = float(np.abs(f - p).max()) if p.size else 0.0
            if not diff <= FUSION_RTOL * scale:  # (also NaN)
                warnings.warn(f"deployq.calib: the oneDNN-fused graph's {name} differs from the plain graph's by "
                              f"{diff:.3g} (max |x| {scale:.3g}); reading the plain graph", RuntimeWarning,
                              stacklevel=3)
                self._internal_syms, self.block = self._plain_syms, plain
                self._stats, self._raw, self._raw_out, self._raw_checked = {}, None, {}, set()
                self.fused = False
                return False
        self.fused = True
        return True

    #: per mode: (values per tensor in the stats vector given num_bins, aux values per tensor or 0 for no aux)
    STATS_LAYOUT = {"range": (lambda b: 2, 0), "clip": (lambda b: 3, 4), "hist": (lambda b: b + 1, 1),
                    "pow2": (lambda b: b + 4, 1)}

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

    def begin(self) -> None:
        """Start of a calibration: the parameters' arrays are read again at the next batch (they may have been
        replaced since the last one; during a calibration they are not)."""
        self._raw_args = None

    def end(self) -> None:
        """End of a calibration: release the output buffers of the in-place reader (every tapped tensor of a
        batch, per input shape)."""
        self._raw_out = {}
        self._raw_result = {}
        self._raw_args = None

    def batch_stats(self, x: mx.nd.NDArray, mode: str, num_bins: int, aux: np.ndarray | None) -> np.ndarray:
        """``dq_calib_stats(tapped tensors of x, aux, mode)`` as a float64 vector: read in place where
        ``deployq.native.rawstats`` can (checked against the in-graph operator once per mode and shape), else by
        :meth:`stats_block`. ``aux``: float64 rows as the operator takes them, or None. The vector is valid until
        the next call."""
        if self.raw_ok is not False:
            out = self._raw_stats(x, mode, num_bins, aux)
            if out is None:  # a tensor the reader refuses (another dtype, device or layout): not tried again
                self.raw_ok = False
            else:
                key = (mode, int(num_bins), tuple(x.shape))
                if key in self._raw_checked:
                    return out
                ref = self._graph_stats(x, mode, num_bins, aux)
                if np.array_equal(out, ref, equal_nan=True):
                    self._raw_checked.add(key)
                    return out
                self.raw_ok = False
                warnings.warn("deployq.calib: in-place activation statistics differ from the in-graph operator's on "
                              "this net; using the in-graph operator (slower)", RuntimeWarning, stacklevel=3)
                return ref
        return self._graph_stats(x, mode, num_bins, aux)

    def accumulate(self, x: mx.nd.NDArray, mode: str, num_bins: int, totals, meanwhile=None) -> None:
        """Add the statistics of batch ``x`` to ``totals`` (a ``deployq.calib.totals.PassTotals`` in ``mode``):
        once the in-place reader has been checked for this mode and shape (:meth:`batch_stats`), directly into
        the totals (``dq_raw_totals``, no per-batch vector), else through :meth:`batch_stats`. ``meanwhile``: a
        callable run exactly once, while the engine computes the batch where it can (the data hash: measured
        1.0-1.2x faster per batch than after it), else before returning."""
        self._meanwhile = meanwhile
        try:
            self._accumulate(x, mode, num_bins, totals)
        finally:
            self._run_meanwhile()

    def _accumulate(self, x, mode, num_bins, totals) -> None:
        from ..native import rawstats

        if self.raw_ok is not False and (mode, int(num_bins), tuple(x.shape)) in self._raw_checked:
            arrays = self._raw_arrays(x, wait=False)
            aux = totals.aux()
            rc = np.zeros(1, dtype=np.int32)
            # on the engine, after the forward (its OpenMP threads; a thread of ours beside them measured slower)
            rawstats.push_totals(arrays, mode, num_bins, aux, totals.buffer, rc)
            try:
                self._run_meanwhile()
            finally:
                mx.nd.waitall()  # (also on an error: the operation writes into totals and rc)
            if rc[0] == 0:
                totals.count += self.size_array(tuple(x.shape))
                return
            self.raw_ok = False  # refused (the totals are unchanged): the in-graph operator from now on
        totals.add(self.batch_stats(x, mode, num_bins, totals.aux()), self.size_array(tuple(x.shape)))

    def _graph_stats(self, x, mode, num_bins, aux):
        blk = self.stats_block(mode, num_bins)
        out = blk(x) if aux is None else blk(x, mx.nd.array(aux, dtype=np.float64))
        return out.asnumpy()

    def _raw_stats(self, x, mode, num_bins, aux) -> np.ndarray | None:
        from ..native import calibops, rawstats

        if rawstats.load() is None or not calibops.available():  # (the operator checks the reader)
            self.raw_ok = False
            return None
        arrays = self._raw_arrays(x)
        n = len(arrays) * self.STATS_LAYOUT[mode][0](num_bins)
        out = self._raw_result.get(n)  # reused: valid until the next batch (the caller consumes it before)
        if out is None:
            out = self._raw_result[n] = np.empty(n, dtype=np.float64)
        aux = None if aux is None else np.ascontiguousarray(aux, dtype=np.float64)
        if rawstats.raw_stats(arrays, mode, num_bins, aux, out) != 0:
            return None
        return out

    def _run_meanwhile(self) -> None:
        if self._meanwhile is not None:  # host work while the engine computes (the caller's, e.g. the data hash)
            self._meanwhile, fn = None, self._meanwhile
            fn()

    def _raw_arrays(self, x: mx.nd.NDArray, wait: bool = True) -> list[mx.nd.NDArray]:
        """The tapped tensors of ``x`` (in the kept output buffers of its shape), computed (``wait``) or launched."""
        if self._raw is None:
            outs = [s for i, s in zip(self.internals, self._internal_syms, strict=True) if i not in self._inputs]
            grp = mx.sym.Group(outs) if outs else None  # None: every tapped tensor is the graph input
            # static_shape: memory planned once per input shape (without it each call re-plans: 1.5x slower)
            flags = [("static_alloc", True), ("static_shape", True)]
            self._raw = mx.nd.CachedOp(grp, flags=flags) if grp is not None else False
            by_name = {p.name: p for p in self._params.values()}
            self._raw_inputs = [] if grp is None else [None if n == "data" else by_name[n] for n in grp.list_inputs()]
        if self._raw_args is None:
            self._raw_args = [None if p is None else p.data() for p in self._raw_inputs]
        args = [x if a is None else a for a in self._raw_args]
        bufs = self._raw_out.get(tuple(x.shape))
        if self._raw is False:
            bufs = []
        elif bufs is None:  # the first batch of a shape allocates the outputs; later ones write into them
            res = self._raw(*args)
            bufs = self._raw_out[tuple(x.shape)] = list(res) if isinstance(res, (list, tuple)) else [res]
        else:
            self._raw(*args, out=bufs)
        res = iter(bufs)
        arrays = [x if i in self._inputs else next(res) for i in self.internals]
        if wait:
            self._run_meanwhile()
            mx.nd.waitall()  # one call instead of one per tapped tensor (the reader needs them all computed)
        return arrays

    def size_array(self, shape: tuple[int, ...]) -> np.ndarray:
        """:meth:`sizes` as an int64 array (kept per shape; read-only)."""
        a = self._size_arrays.get(shape)
        if a is None:
            a = self._size_arrays[shape] = np.array(self.sizes(shape), dtype=np.int64)
            a.flags.writeable = False
        return a

    def sizes(self, shape: tuple[int, ...]) -> list[int]:
        """Number of values of every tapped tensor for an input of ``shape``."""
        n = self._sizes.get(shape)
        if n is None:
            syms = mx.sym.Group(self._internal_syms)
            _, out_shapes, _ = syms.infer_shape_partial(data=shape)
            n = self._sizes[shape] = [int(np.prod(s)) for s in out_shapes]
        return n
