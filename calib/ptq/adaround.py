"""AdaRound (Nagel et al. 2020): learned up/down rounding of each weight on the layer's exact weight grid,
against the layer's fp32 output; QDrop (Wei et al. 2022) as an option.

Per quantized layer, in network order: the grid is the layer's own (``blk.quantized_weight()``: the step per
output channel of its max-abs grid, per channel, ncnn's per group, 6-bit for ncnn's winograd 3x3, Tengine's),
so ``W = s (floor(W_f / s) + h(V))`` with the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) +
gamma, 0, 1)`` (zeta = 1.1, gamma = -0.1), V initialised so that h(V) is the fractional part. The loss is the
reconstruction error of the layer's output (after the activation the IR fuses into it: ReLU, ReLU6) on its
*simulated* input (earlier layers quantized with their learned rounding, the layer's own input grid and range)
against the fp32 net's output, summed over the output and averaged over the batch, plus
``reg * sum(1 - |2h - 1|^beta)`` with beta annealed from 20 to 2 after a warm-up without it (Adam on V). The
final code is ``floor + (V >= 0)``; a weight whose nearest code is the grid's end (each unit's max |W|, which
fixes the step) keeps its nearest code, so the step is unchanged.

The learned codes are written into the stored float weights (``codes * s`` as the layer's BN-folded weight;
``deployq.calib.ptq.layers.set_folded_weight``), so the result is an ordinary quantized net: the simulation and
every exporter round those weights to exactly the learned codes (checked after writing).

QDrop (``qdrop > 0``): in each iteration every input element is taken, with that probability, from the fp32
net's input to the layer instead of the simulated (quantized) one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from deployq.progress import progress

from .layers import (
    activation_of,
    fp32_graph,
    fp32_tensors,
    layer_forward,
    set_folded_weight,
    simulated_input,
    weight_codes,
    weight_grid_step,
)

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """Iterations per layer, batch size, Adam learning rate on V, regulariser weight, beta schedule, warm-up
    share of the iterations, QDrop probability and the random seed (batches, QDrop masks)."""

    iters: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    qdrop: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.lr <= 0 or self.reg < 0 or not 0 <= self.warmup < 1 \
                or not 0 <= self.qdrop < 1:
            raise ValueError(f"AdaRoundConfig: bad values {asdict(self)} (iters, batch_size >= 1; lr > 0; reg >= 0; "
                             "warmup, qdrop in [0, 1))")


def rectified_sigmoid(F, v):
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return F.clip(F.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = ``rest`` (the fractional part of W / s)."""
    r = np.clip(rest, 1e-4, 1 - 1e-4)
    return (-np.log((ZETA - GAMMA) / (r - GAMMA) - 1)).astype(np.float32)


def _beta(it: int, cfg: AdaRoundConfig) -> float | None:
    start = int(cfg.warmup * cfg.iters)
    if it < start:
        return None
    frac = (it - start) / max(1, cfg.iters - start)
    hi, lo = cfg.beta
    return lo + (hi - lo) * max(0.0, 1 - frac)


def _output_mse(F, y, t):
    return F.mean(F.sum(F.reshape(F.square(y - t), (0, -1)), axis=1))


def round_layer(blk: Any, node: Any, xq: np.ndarray, target: np.ndarray, x_fp: np.ndarray | None,
                cfg: AdaRoundConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Learn the rounding of one layer and write it (see the module docstring); returns the layer's output
    MSE with nearest rounding and with the learned one (on its calibration inputs) and the codes."""
    wf, s, qmin, qmax = weight_grid_step(blk)
    _, bf = blk.folded_weight_bias()
    shape = wf.shape
    safe = np.where(s > 0, s, 1).astype(np.float32)
    ws = wf / safe
    nearest = np.clip(np.round(ws), qmin, qmax)
    fl = np.floor(ws)
    fixed = (np.abs(nearest) >= qmax) | np.broadcast_to(s == 0, shape)  # the unit's max |W| fixes the step
    act = activation_of(node)
    s_nd, fl_nd, b_nd = mx.nd.array(np.broadcast_to(s, shape)), mx.nd.array(fl), mx.nd.array(bf)
    keep_nd, fixed_w = mx.nd.array(1.0 - fixed), mx.nd.array(np.where(fixed, nearest * s, 0).astype(np.float32))
    lo_nd, hi_nd = mx.nd.array(np.full(shape, qmin, np.float32)), mx.nd.array(np.full(shape, qmax, np.float32))

    def soft_weight(v, hard: bool = False):
        h = (v >= 0) if hard else rectified_sigmoid(mx.nd, v)
        code = mx.nd.broadcast_minimum(mx.nd.broadcast_maximum(fl_nd + h, lo_nd), hi_nd)
        return code * s_nd * keep_nd + fixed_w, h

    def mse(w) -> float:
        tot = 0.0
        for i in range(0, len(xq), 256):
            y = layer_forward(mx.nd, node, mx.nd.array(xq[i:i + 256]), w, b_nd, act)
            tot += float(mx.nd.sum(mx.nd.square(y - mx.nd.array(target[i:i + 256]))).asscalar())
        return tot / len(xq)

    before = mse(mx.nd.array((nearest * s).astype(np.float32)))
    v = mx.nd.array(init_v(ws - fl))
    v.attach_grad()
    m, u = mx.nd.zeros_like(v), mx.nd.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    n = len(xq)
    for it in range(cfg.iters):
        idx = rng.integers(0, n, min(cfg.batch_size, n))
        xb = xq[idx]
        if cfg.qdrop > 0 and x_fp is not None:
            xb = np.where(rng.random(xb.shape) < cfg.qdrop, x_fp[idx], xb)
        xb_nd, tb = mx.nd.array(xb), mx.nd.array(target[idx])
        beta = _beta(it, cfg)
        with autograd.record():
            w, h = soft_weight(v)
            loss = _output_mse(mx.nd, layer_forward(mx.nd, node, xb_nd, w, b_nd, act), tb)
            if beta is not None and cfg.reg > 0:
                loss = loss + cfg.reg * mx.nd.sum((1 - mx.nd.power(mx.nd.abs(2 * h - 1), beta)) * keep_nd)
        loss.backward()
        gr = v.grad
        m[:] = b1 * m + (1 - b1) * gr
        u[:] = b2 * u + (1 - b2) * gr * gr
        mh, uh = m / (1 - b1 ** (it + 1)), u / (1 - b2 ** (it + 1))
        v[:] = v - cfg.lr * mh / (mx.nd.sqrt(uh) + eps)
    w_hard, _ = soft_weight(v, hard=True)
    after = mse(w_hard)
    codes = np.where(fixed, nearest, np.clip(fl + (v.asnumpy() >= 0), qmin, qmax)).astype(np.int32)
    set_folded_weight(blk, (codes * s).astype(np.float32))
    return {"mse_nearest": before, "mse_learned": after, "codes": codes,
            "changed": float(np.mean(codes != nearest))}


#: the fp32 tensors of all layers are computed in one run when they take at most this many bytes
FP32_CACHE_BYTES = 512 << 20


def _fp32_cache(g: Any, x: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray] | None:
    """Every tensor of ``tensors`` over ``x`` in one run of the fp32 graph, or None when they would take more
    than :data:`FP32_CACHE_BYTES` (then each layer runs the graph for its own)."""
    from deployq.exporters.ir.mxnet_lower import tensor_shapes

    shapes = tensor_shapes(g, 1)
    need = sum(int(np.prod(shapes[t])) for t in set(tensors)) * 4 * len(x)
    return fp32_tensors(g, x, tensors) if need <= FP32_CACHE_BYTES else None


def adaround(qnet: gluon.HybridBlock, x: np.ndarray, config: AdaRoundConfig | None = None,
             layers: list[str] | None = None, quiet: bool = True, reference: Any = None) -> dict[str, Any]:
    """Learn the weight rounding of every quantized layer (or ``layers``) of ``qnet`` in place, in network order,
    on calibration images ``x`` (the input ranges must be set: calibrate first). Returns per layer the output
    MSE with nearest and learned rounding, the share of codes changed, and the seconds taken. ``reference``: the
    fp32 graph IR to reconstruct (default: the net's float graph now; pass the one taken before an earlier pass
    that changed the stored floats, such as bias correction)."""
    from deployq.api import _clear_cache, quant_layers

    cfg = config or AdaRoundConfig()
    rng = np.random.default_rng(cfg.seed)
    x = np.asarray(x, np.float32)
    g = reference if reference is not None else fp32_graph(qnet, x.shape[1:])
    q = quant_layers(qnet)
    todo = [p for p in q if (layers is None or p in layers) and q[p].layer_config.weight is not None]
    report: dict[str, Any] = {"config": asdict(cfg), "images": int(len(x)), "layers": {}}
    t0 = time.perf_counter()
    bar = progress(total=len(todo), desc="adaround" + (" + qdrop" if cfg.qdrop else ""), disable=quiet)
    wants = {}
    for path in todo:
        node = g.node(path)
        wants[path] = [node.inputs[0], node.output]
        if activation_of(node) is not None:
            wants[path].append(g.consumers(node.output)[0].output)
    cache = _fp32_cache(g, x, [t for w in wants.values() for t in w])
    for path in todo:
        blk, node = q[path], g.node(path)
        want = wants[path]
        fp = cache if cache is not None else fp32_tensors(g, x, want)
        target = fp[want[-1]]
        x_fp = None
        if cfg.qdrop > 0:
            x_fp = fp[node.inputs[0]]
            if blk.layer_config.input_relu:
                x_fp = np.maximum(x_fp, 0)
        xq = simulated_input(qnet, path, x)
        t1 = time.perf_counter()
        r = round_layer(blk, node, xq, target, x_fp, cfg, rng)
        _clear_cache(qnet)
        got = weight_codes(blk)
        if not np.array_equal(got.reshape(r["codes"].shape), r["codes"]):
            bad = int(np.sum(got.reshape(r["codes"].shape) != r["codes"]))
            raise RuntimeError(f"layer {path}: {bad} weight code(s) differ from the learned ones after writing")
        report["layers"][path] = {"mse_nearest": r["mse_nearest"], "mse_learned": r["mse_learned"],
                                  "codes_changed": r["changed"], "seconds": time.perf_counter() - t1}
        bar.update(1)
    bar.close()
    report["seconds"] = time.perf_counter() - t0
    return report
