"""The reconstruction engine of AdaRound and BRECQ: the quantized net and its fp32 reference graph run *once*
over the calibration images, unit after unit (a unit: one layer and its fused activation for AdaRound, a block
for BRECQ), keeping only the activations still needed (the live tensors of the exporters' graph IR).

For each unit, in network order: the fp32 graph is advanced over the unit (its output: the target), the unit's
rounding is learned on random minibatches of its cached *simulated* inputs, the learned codes are written into
the net, and the quantized net is advanced over the unit with its own layers (exactly the simulation:
their input grids and ranges, int32 biases, output quantizers). So each activation is computed once per path;
nothing re-runs the net's prefix. The caches are float32, or float16 where the live tensors of all images
would take more than ``cache_bytes`` (then the stored quantized-path inputs differ from the simulation's by
float16 rounding). With ``time_budget`` in the config, each unit runs the iterations that fit
(``deployq.calib.ptq.budget``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from deployq.progress import progress

from .adaround import Adam, AdaRoundConfig, LayerRounding, beta_at, output_mse
from .budget import Budget
from .layers import activation_of, fp32_graph, imperative, layer_forward, quantize_input

WEIGHTED = ("Convolution", "FullyConnected")
#: above this many bytes for the cached activations of all images, they are stored as float16
CACHE_BYTES = 2 << 30
#: images per batch when advancing the caches
ADVANCE_BATCH = 32
#: the before/after MSE of a unit is measured on at most this many of the calibration images
MSE_IMAGES = 128


@dataclass(frozen=True)
class Unit:
    """Nodes (indices into ``graph.nodes``) whose layers ``layers`` learn their rounding jointly against the
    fp32 values of ``outputs``, fed with ``inputs``; ``start``/``stop``: the node range the caches advance
    over (``nodes`` lie in it)."""

    start: int
    stop: int
    nodes: tuple[int, ...]
    layers: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def last_uses(g: Any) -> dict[str, int]:
    """Per tensor, the index of its last consumer (``len(nodes)`` for a graph output)."""
    out: dict[str, int] = {}
    for k, n in enumerate(g.nodes):
        for t in n.inputs:
            out[t] = k
    for t in g.outputs:
        out[t] = len(g.nodes)
    return out


def live_at(g: Any, k: int, uses: dict[str, int] | None = None) -> list[str]:
    """The tensors produced before node ``k`` and read at or after it."""
    uses = uses or last_uses(g)
    made = [g.input_name] + [t for n in g.nodes[:k] for t in n.outputs]
    return [t for t in made if uses.get(t, -1) >= k]


def layer_units(g: Any, layers: list[str], **_: Any) -> list[Unit]:
    """AdaRound's units: each layer with the activation fused into it (``fusable_activation``)."""
    index = {n.name: k for k, n in enumerate(g.nodes)}
    units = []
    for path in sorted(layers, key=lambda p: index[p]):
        k = index[path]
        n = g.nodes[k]
        nodes = [k]
        if activation_of(n) is not None:
            nodes.append(index[g.consumers(n.output)[0].name])
        last = g.nodes[nodes[-1]]
        units.append(Unit(k, nodes[-1] + 1, tuple(nodes), (path,), (n.inputs[0],), (last.output,)))
    return units


def _is_depthwise(n: Any) -> bool:
    return n.op == "Convolution" and int(n.attrs.get("num_group", 1)) > 1


def block_units(g: Any, layers: list[str], max_layers: int = 4, **_: Any) -> list[Unit]:
    """BRECQ's blocks: the graph cut where a single tensor is live (a residual block runs from one such cut to
    the next); cut segments without a weighted layer join the one before (the first: the one after);
    consecutive one-layer segments (a plain chain) are grouped up to ``max_layers`` layers, a group ending
    after a layer that is not depthwise (so mobilenet's depthwise + pointwise pairs form blocks). A block whose
    only layer is learned is AdaRound of that layer against the block's output."""
    uses = last_uses(g)
    cuts = [k for k in range(len(g.nodes) + 1) if len(live_at(g, k, uses)) == 1]
    if cuts[-1] != len(g.nodes):
        cuts.append(len(g.nodes))
    segs = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    weighted = [[k for k in range(a, b) if g.nodes[k].op in WEIGHTED] for a, b in segs]
    merged: list[list[int]] = []  # [start, stop, n_layers]
    for (a, b), w in zip(segs, weighted, strict=True):
        if merged and (not w or merged[-1][2] == 0):
            merged[-1][1], merged[-1][2] = b, merged[-1][2] + len(w)
        else:
            merged.append([a, b, len(w)])
    blocks: list[tuple[int, int]] = []
    open_: list[int] | None = None
    for a, b, nw in merged:
        ws = [k for k in range(a, b) if g.nodes[k].op in WEIGHTED]
        if nw == 1 and max_layers > 1:
            if open_ is None:
                open_ = [a, b, 0]
            open_[1], open_[2] = b, open_[2] + 1
            if open_[2] >= max_layers or not _is_depthwise(g.nodes[ws[0]]):
                blocks.append((open_[0], open_[1]))
                open_ = None
            continue
        if open_ is not None:
            blocks.append((open_[0], open_[1]))
            open_ = None
        blocks.append((a, b))
    if open_ is not None:
        blocks.append((open_[0], open_[1]))
    wanted = set(layers)
    units = []
    for a, b in blocks:
        learn = tuple(g.nodes[k].name for k in range(a, b) if g.nodes[k].name in wanted)
        if not learn:
            continue
        made = {t for k in range(a, b) for t in g.nodes[k].outputs}
        ins = tuple(t for t in live_at(g, a, uses) if any(t in g.nodes[k].inputs for k in range(a, b)))
        outs = tuple(t for t in live_at(g, b, uses) if t in made)
        units.append(Unit(a, b, tuple(range(a, b)), learn, ins, outs))
    return units


class NetWalk:
    """The fp32 reference graph ``g`` and the quantized net ``qnet`` advanced node by node over the images ``x``
    (see the module docstring): ``cache["fp"]`` / ``cache["q"]`` hold the live tensors at ``pos[...]``."""

    def __init__(self, qnet: gluon.HybridBlock, g: Any, x: np.ndarray, cache_bytes: int = CACHE_BYTES) -> None:
        from deployq.exporters.ir.mxnet_lower import tensor_shapes

        from deployq.api import output_quantizers, quant_layers

        self.qnet, self.g, self.n = qnet, g, len(x)
        self.q = quant_layers(qnet)
        self.oq = {g.resolve(o.tensor): o for o in output_quantizers(qnet).values()}
        self.uses = last_uses(g)
        shapes = self.shapes = tensor_shapes(g, 1)
        peak = max(sum(int(np.prod(shapes[t])) for t in live_at(g, k, self.uses)) for k in range(len(g.nodes) + 1))
        # both paths, and the unit's target beside its inputs
        self.dtype = np.float32 if 4 * peak * len(x) * 3 <= cache_bytes else np.float16
        x = np.asarray(x, np.float32)
        self.cache: dict[str, dict[str, np.ndarray]] = {"fp": {g.input_name: x}, "q": {g.input_name: x}}
        self.pos = {"fp": 0, "q": 0}
        self._generic: dict[str, tuple[gluon.SymbolBlock, list[mx.nd.NDArray]]] = {}
        self._ref: dict[str, tuple[mx.nd.NDArray, mx.nd.NDArray | None]] = {}
        self._hard: dict[str, Fixed] = {}
        #: the learnable input ranges of the unit being trained
        self.ranges: dict[str, InputRange] = {}
        for n in g.nodes:
            if n.name in self.q and n.op in WEIGHTED:
                self._check_layer(n)

    def _check_layer(self, n: Any) -> None:
        blk = self.q[n.name]
        wf, _ = blk.folded_weight_bias()
        w = self.g.param(n, "weight")
        if w is None or w.size != wf.size:
            raise ValueError(f"layer {n.name}: the quantized layer's weight {wf.shape} is not the graph's "
                             f"{None if w is None else w.shape} (a BatchNorm the net does not fold?)")
        act = getattr(blk, "act", None)
        if act is not None and getattr(act, "_act_type", None) != "relu":
            raise ValueError(f"layer {n.name}: its own activation {getattr(act, '_act_type', act)!r} is not "
                             "supported by the reconstruction (relu only)")

    # ------------------------------------------------------------------ one node, MXNet NDArrays
    def fp32_node(self, n: Any, xs: list[mx.nd.NDArray]) -> mx.nd.NDArray:
        """Node ``n`` of the fp32 graph."""
        if n.op in WEIGHTED:
            if n.name not in self._ref:
                b = self.g.param(n, "bias")
                self._ref[n.name] = (mx.nd.array(self.g.param(n, "weight")), None if b is None else mx.nd.array(b))
            w, b = self._ref[n.name]
            return layer_forward(mx.nd, n, xs[0], w, b)
        return self._other(n, xs)

    def _other(self, n: Any, xs: list[mx.nd.NDArray]) -> mx.nd.NDArray:
        from deployq.exporters.ir.mxnet_lower import _op_symbol

        if len(n.outputs) != 1:
            raise ValueError(f"node {n.name}: {n.op} with {len(n.outputs)} outputs is not supported by the "
                             "reconstruction")
        if n.name not in self._generic:
            ins = [mx.sym.var(f"in{i}") for i in range(len(n.inputs))]
            ps = {r: mx.sym.var(f"p_{r}") for r in n.params}
            blk = gluon.SymbolBlock(_op_symbol(n, ins, ps), ins + list(ps.values()))
            self._generic[n.name] = (blk, [mx.nd.array(self.g.params[k]) for k in n.params.values()])
        blk, params = self._generic[n.name]
        return blk(*xs, *params)

    def quant_node(self, n: Any, xs: list[mx.nd.NDArray], soft: dict[str, LayerRounding] | None = None,
                   drop: Callable[[mx.nd.NDArray, mx.nd.NDArray], mx.nd.NDArray] | None = None,
                   fp_in: mx.nd.NDArray | None = None) -> mx.nd.NDArray:
        """Node ``n`` of the quantized net: a quantized layer as the net runs it, or with the soft rounding of
        ``soft`` (``drop(raw, quantized)``: QDrop's mixing of its input; ``fp_in``: the fp32 input that
        replaces dropped elements instead of the raw one); other nodes as the graph, and a block's output
        quantizer after the tensor it quantizes."""
        blk = self.q.get(n.name)
        if blk is None or n.op not in WEIGHTED:
            y = self._other(n, xs) if n.op not in WEIGHTED else self.fp32_node(n, xs)
        elif soft is not None and n.name in soft:
            y = self._soft_layer(n, blk, xs[0], soft[n.name], drop, fp_in)
        elif drop is not None:
            y = self._soft_layer(n, blk, xs[0], self._fixed(n.name), drop, fp_in)
        else:
            y = blk(xs[0])
        oq = self.oq.get(n.output)
        return y if oq is None else oq(y)

    def _fixed(self, path: str) -> Fixed:
        """A quantized layer that does not learn: its quantized weight and folded bias."""
        if path not in self._hard:
            blk = self.q[path]
            wq, _ = blk.quantized_weight()
            self._hard[path] = Fixed(mx.nd.array(wq), mx.nd.array(blk.folded_weight_bias()[1]))
        return self._hard[path]

    def _soft_layer(self, n, blk, x, r, drop, fp_in) -> mx.nd.NDArray:
        rng = self.ranges.get(n.name)
        xq = quantize_input(blk, x, None if rng is None else rng.bounds())
        if drop is not None:
            raw = fp_in if fp_in is not None else x
            xq = drop(mx.nd.relu(raw) if blk.layer_config.input_relu else raw, xq)
        return layer_forward(mx.nd, n, xq, r.weight(), r.bias)

    # ------------------------------------------------------------------ advancing the caches
    def advance(self, path: str, stop: int, keep: tuple[str, ...] = ()) -> None:
        """Run ``path`` ("fp" or "q") from its position to node ``stop`` over all images; keep the live tensors
        there (and ``keep``)."""
        pos, cache, g = self.pos[path], self.cache[path], self.g
        if stop <= pos:
            return
        want = [t for t in live_at(g, stop, self.uses)] + [t for t in keep if t not in cache]
        made = {t for n in g.nodes[pos:stop] for t in n.outputs}
        new = [t for t in dict.fromkeys(want) if t in made]
        feeds = [t for t in cache if self.uses.get(t, -1) >= pos]
        parts: dict[str, list[np.ndarray]] = {t: [] for t in new}
        with imperative(self.qnet), autograd.predict_mode():
            for i in range(0, self.n, ADVANCE_BATCH):
                vals = {t: mx.nd.array(cache[t][i:i + ADVANCE_BATCH], dtype="float32") for t in feeds}
                for n in g.nodes[pos:stop]:
                    xs = [vals[t] for t in n.inputs]
                    vals[n.output] = self.fp32_node(n, xs) if path == "fp" else self.quant_node(n, xs)
                for t in new:
                    parts[t].append(vals[t].asnumpy().astype(self.dtype))
        kept = {t: cache[t] for t in cache if t in want or t in keep}
        kept.update({t: np.concatenate(v) for t, v in parts.items()})
        self.cache[path], self.pos[path] = kept, stop

    def forward(self, u: Unit, feeds: dict[str, mx.nd.NDArray], soft: dict[str, Any] | None = None,
                drop=None, fp_feeds: dict[str, mx.nd.NDArray] | None = None) -> dict[str, mx.nd.NDArray]:
        """The unit's outputs on the quantized path from ``feeds``: the layers of ``soft`` with its weights
        (:class:`LayerRounding` or :class:`Fixed`), QDrop's ``drop`` at each layer input; with ``fp_feeds``,
        dropped elements of a layer reading a unit input come from the fp32 net instead."""
        vals = dict(feeds)
        for k in u.nodes:
            n = self.g.nodes[k]
            xs = [vals[t] for t in n.inputs]
            fp_in = fp_feeds.get(n.inputs[0]) if fp_feeds is not None and n.op in WEIGHTED else None
            vals[n.output] = self.quant_node(n, xs, soft, drop, fp_in)
        return {t: vals[t] for t in u.outputs}


@dataclass
class Fixed:
    """A layer's fixed (BN-folded, quantized) weight and bias in a unit's forward."""

    w: mx.nd.NDArray
    bias: mx.nd.NDArray

    def weight(self) -> mx.nd.NDArray:
        return self.w


class InputRange:
    """A layer's learnable input range: the calibrated (lo, hi) times ``exp(a)`` (one scalar ``a``, starting at
    0), trained through the input quantizer's straight-through gradient (LSQ's step gradient); ``write`` sets it
    as the layer's calibrated range. Only for quantizers that quantize with their tracked range as it is."""

    def __init__(self, blk: Any) -> None:
        self.blk = blk
        self.lo, self.hi = blk.input_range()
        self.a = mx.nd.zeros((1,))
        self.a.attach_grad()

    @staticmethod
    def applies(blk: Any) -> bool:
        from deployq.quantizers.base import Quantizer

        return blk.layer_config.input is not None and \
            type(blk.quantizer).input_quant_range is Quantizer.input_quant_range

    def bounds(self) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
        f = mx.nd.exp(self.a)
        return self.lo * f, self.hi * f

    def write(self) -> tuple[float, float]:
        f = float(np.exp(self.a.asnumpy()[0]))
        lo, hi = float(np.float32(self.lo * f)), float(np.float32(self.hi * f))
        self.blk.set_input_range(lo, hi)
        return lo, hi


def _unit_mse(walk: NetWalk, u: Unit, targets: dict[str, np.ndarray], weights: dict[str, Fixed]) -> float:
    """Sum over the unit's outputs of the squared error per image against ``targets``, averaged over the
    first :data:`MSE_IMAGES` images, with the layers' ``weights``."""
    tot = 0.0
    q = walk.cache["q"]
    n = min(walk.n, MSE_IMAGES)
    with autograd.predict_mode():
        for i in range(0, n, 64):
            j = min(i + 64, n)
            feeds = {t: mx.nd.array(q[t][i:j], dtype="float32") for t in u.inputs}
            for t, y in walk.forward(u, feeds, weights).items():
                d = y - mx.nd.array(targets[t][i:j], dtype="float32")
                tot += float(mx.nd.sum(mx.nd.square(d)).asscalar())
    return tot / n


def reconstruct(qnet: gluon.HybridBlock, x: np.ndarray, cfg: AdaRoundConfig, units_of: Callable[..., list[Unit]],
                layers: list[str] | None = None, quiet: bool = True, reference: Any = None, desc: str = "",
                fp32_drop: bool = False, learn_ranges: bool = False, range_lr: float = 1e-2,
                cache_bytes: int = CACHE_BYTES, diagnose: bool = False, **unit_options: Any) -> dict[str, Any]:
    """Learn the rounding of the units ``units_of(graph, layers)`` of ``qnet`` in place (module docstring).
    ``fp32_drop``: QDrop replaces dropped inputs of a unit's first layer by the fp32 net's (AdaRound's layer-wise
    variant) instead of dropping the quantization of each layer's input inside the unit (QDrop's);
    ``learn_ranges``: learn each layer's input range with its rounding (:class:`InputRange`); ``diagnose``:
    also measure each unit's output MSE over ``x`` (at most :data:`MSE_IMAGES`) with nearest and with learned
    rounding (two extra passes per unit; None without). Returns per layer (``layers``) and per unit
    (``units``) those MSEs, the share of codes changed, and the seconds of each phase."""
    from deployq.api import quant_layers

    x = np.asarray(x, np.float32)
    g = reference if reference is not None else fp32_graph(qnet, x.shape[1:])
    q = quant_layers(qnet)
    todo = [p for p in q if (layers is None or p in layers) and q[p].layer_config.weight is not None]
    units = units_of(g, todo, **unit_options)
    walk = NetWalk(qnet, g, x, cache_bytes)
    rng = np.random.default_rng(cfg.seed)
    report: dict[str, Any] = {"config": asdict(cfg), "images": int(len(x)), "cache_dtype": np.dtype(walk.dtype).name,
                              "layers": {}, "units": []}
    t0 = time.perf_counter()
    phases = {"advance": 0.0, "mse": 0.0, "train": 0.0}
    budget = None if cfg.time_budget is None else Budget(cfg.time_budget, cfg.iters)
    bar = progress(total=len(units), desc=desc + (" + qdrop" if cfg.qdrop else ""), disable=quiet)
    with imperative(qnet):  # the quantized layers called one by one (not as parts of a cached graph)
        if budget is not None:
            budget.probed([_probe(walk, u, q, cfg, learn_ranges, fp32_drop, range_lr) for u in units])
        for k, u in enumerate(units):
            t1 = time.perf_counter()
            walk.advance("fp", u.start)
            walk.advance("q", u.start)
            fp_in = {t: walk.cache["fp"][t] for t in u.inputs} if fp32_drop and cfg.qdrop > 0 else None
            walk.advance("fp", u.stop, keep=u.outputs)
            targets = {t: walk.cache["fp"][t] for t in u.outputs}
            soft = {p: LayerRounding(q[p]) for p in u.layers}
            t2 = time.perf_counter()
            before = _unit_mse(walk, u, targets, {p: Fixed(r.nearest_weight(), r.bias) for p, r in soft.items()}) \
                if diagnose else None
            if learn_ranges:
                walk.ranges = {p: InputRange(q[p]) for p in u.layers if InputRange.applies(q[p])}
            t3 = time.perf_counter()
            if budget is not None:
                budget.advanced(k, t2 - t1, first=True)
            iters = cfg.iters if budget is None else budget.iters_for(k)
            _train(walk, u, soft, targets, fp_in, replace(cfg, iters=iters), rng, range_lr)
            t4 = time.perf_counter()
            after = _unit_mse(walk, u, targets, {p: Fixed(r.weight(hard=True), r.bias) for p, r in soft.items()}) \
                if diagnose else None
            t5 = time.perf_counter()
            ranges = {p: r.write() for p, r in walk.ranges.items()}
            walk.ranges = {}
            rep_u = {"layers": list(u.layers), "iters": iters, "mse_nearest": before, "mse_learned": after,
                     "seconds": 0.0}
            for p, r in soft.items():
                changed = r.changed()
                r.write(p, qnet)
                report["layers"][p] = {"mse_nearest": before, "mse_learned": after, "codes_changed": changed,
                                       "block": u.outputs[0]}
                if p in ranges:
                    report["layers"][p]["input_range"] = ranges[p]
            t6 = time.perf_counter()
            walk.advance("q", u.stop)
            if budget is not None:
                budget.advanced(k, time.perf_counter() - t6, first=False)
            rep_u["seconds"] = time.perf_counter() - t1
            phases["advance"] += t2 - t1 + time.perf_counter() - t5
            phases["mse"] += t3 - t2 + t5 - t4
            phases["train"] += t4 - t3
            for p in u.layers:
                report["layers"][p]["seconds"] = rep_u["seconds"] / len(u.layers)
            report["units"].append(rep_u)
            if budget is not None:
                bar.set_postfix_str(f"{iters} iterations")
            bar.update(1)
    bar.close()
    report["seconds"] = time.perf_counter() - t0
    report["phase_seconds"] = phases
    if budget is not None:
        report["budget"] = budget.report()
    return report


def _train(walk: NetWalk, u: Unit, soft: dict[str, LayerRounding], targets: dict[str, np.ndarray],
           fp_in: dict[str, np.ndarray] | None, cfg: AdaRoundConfig, rng: np.random.Generator,
           range_lr: float) -> None:
    """Train the unit's rounding (and its layers' input ranges) for ``cfg.iters`` iterations."""
    q = walk.cache["q"]
    step = _Step(walk, u, soft, cfg, rng, range_lr)
    n = walk.n
    for it in range(cfg.iters):
        idx = np.sort(rng.choice(n, min(cfg.batch_size, n), replace=False))
        feeds = {t: mx.nd.array(q[t][idx], dtype="float32") for t in u.inputs}
        tb = {t: mx.nd.array(v[idx], dtype="float32") for t, v in targets.items()}
        fpf = None if fp_in is None else {t: mx.nd.array(v[idx], dtype="float32") for t, v in fp_in.items()}
        step(feeds, tb, fpf, beta_at(it, cfg))
    mx.nd.waitall()


class _Step:
    """One training iteration of a unit: forward with the soft rounding (QDrop's mixing), the loss against the
    fp32 targets plus the rounding regulariser at ``beta``, backward, Adam on V (and the input ranges)."""

    def __init__(self, walk: NetWalk, u: Unit, soft: dict[str, LayerRounding], cfg: AdaRoundConfig,
                 rng: np.random.Generator, range_lr: float) -> None:
        self.walk, self.u, self.soft, self.cfg, self.rng = walk, u, soft, cfg, rng
        self.opt = Adam([r.v for r in soft.values()], cfg.lr)
        self.ropt = Adam([r.a for r in walk.ranges.values()], range_lr) if walk.ranges else None

    def drop(self, raw, xq):
        mask = mx.nd.array(self.rng.random(raw.shape, dtype=np.float32) < self.cfg.qdrop)
        return mx.nd.where(mask, raw, xq)

    def __call__(self, feeds, tb, fpf, beta: float | None) -> None:
        with autograd.record(train_mode=False):
            out = self.walk.forward(self.u, feeds, self.soft, self.drop if self.cfg.qdrop > 0 else None, fpf)
            loss = mx.nd.add_n(*[output_mse(mx.nd, out[t], tb[t]) for t in self.u.outputs])
            if beta is not None and self.cfg.reg > 0:
                loss = loss + self.cfg.reg * mx.nd.add_n(*[r.penalty(beta) for r in self.soft.values()])
        loss.backward()
        self.opt.step()
        if self.ropt is not None:
            self.ropt.step()


def _probe(walk: NetWalk, u: Unit, q: dict[str, Any], cfg: AdaRoundConfig, learn_ranges: bool, fp32_drop: bool,
           range_lr: float) -> float:
    """Seconds of one training iteration of unit ``u``: the second of two on zero inputs of its shapes, each
    with the batch drawn from cache-sized arrays of the cache's dtype and converted as :func:`_train` does,
    the regulariser on; nothing of the net or the walk changes."""
    shapes = walk.shapes
    b = min(cfg.batch_size, walk.n)
    rng = np.random.default_rng(0)
    cache = {t: np.zeros((walk.n,) + tuple(shapes[t][1:]), walk.dtype) for t in (*u.inputs, *u.outputs)}

    def batch(ts):
        idx = np.sort(rng.choice(walk.n, b, replace=False))
        return {t: mx.nd.array(cache[t][idx], dtype="float32") for t in ts}

    soft = {p: LayerRounding(q[p]) for p in u.layers}
    if learn_ranges:
        walk.ranges = {p: InputRange(q[p]) for p in u.layers if InputRange.applies(q[p])}
    try:
        step = _Step(walk, u, soft, cfg, rng, range_lr)
        drop_feeds = fp32_drop and cfg.qdrop > 0
        seconds = 0.0
        for _ in range(2):
            mx.nd.waitall()
            t = time.perf_counter()
            step(batch(u.inputs), batch(u.outputs), batch(u.inputs) if drop_feeds else None, cfg.beta[0])
            mx.nd.waitall()
            seconds = time.perf_counter() - t
        return seconds
    finally:
        walk.ranges = {}
