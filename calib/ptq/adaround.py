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

The inputs and targets come from ``deployq.calib.ptq.recon`` (the net and its fp32 graph advanced once over
the calibration images, layer after layer); block reconstruction (``brecq``) uses the same
:class:`LayerRounding` for several layers at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from .layers import (
    set_folded_weight,
    weight_codes,
    weight_grid_step,
)

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """Iterations per layer, batch size, Adam learning rate on V, regulariser weight, beta schedule, warm-up
    share of the iterations, QDrop probability and the random seed (batches, QDrop masks). ``time_budget``:
    seconds for the whole pass; each unit then runs the iterations that fit, at most ``iters``
    (``deployq.calib.ptq.budget``)."""

    iters: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    qdrop: float = 0.0
    seed: int = 0
    time_budget: float | None = None

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.lr <= 0 or self.reg < 0 or not 0 <= self.warmup < 1 \
                or not 0 <= self.qdrop < 1 or (self.time_budget is not None and self.time_budget <= 0):
            raise ValueError(f"AdaRoundConfig: bad values {asdict(self)} (iters, batch_size >= 1; lr > 0; reg >= 0; "
                             "warmup, qdrop in [0, 1); time_budget > 0 seconds or None)")


def rectified_sigmoid(F, v):
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return F.clip(F.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(rest: np.ndarray) -> np.ndarray:
    """V with h(V) = ``rest`` (the fractional part of W / s)."""
    r = np.clip(rest, 1e-4, 1 - 1e-4)
    return (-np.log((ZETA - GAMMA) / (r - GAMMA) - 1)).astype(np.float32)


def beta_at(it: int, cfg: AdaRoundConfig) -> float | None:
    """The regulariser's beta at iteration ``it`` (None during the warm-up)."""
    start = int(cfg.warmup * cfg.iters)
    if it < start:
        return None
    frac = (it - start) / max(1, cfg.iters - start)
    hi, lo = cfg.beta
    return lo + (hi - lo) * max(0.0, 1 - frac)


def output_mse(F, y, t):
    """The reconstruction loss: squared error summed over the output, averaged over the batch."""
    return F.mean(F.sum(F.reshape(F.square(y - t), (0, -1)), axis=1))


class LayerRounding:
    """AdaRound's learnable rounding of one quantized layer on its own weight grid (see the module docstring):
    ``weight()`` the soft (or hard) rounded BN-folded weight, ``penalty(beta)`` the regulariser, ``codes()`` the
    final codes, ``write()`` stores them as the layer's weights and checks that the layer rounds them back."""

    def __init__(self, blk: Any) -> None:
        wf, s, qmin, qmax = weight_grid_step(blk)
        _, bf = blk.folded_weight_bias()
        self.blk, self.shape, self.step, self.qmin, self.qmax = blk, wf.shape, s, qmin, qmax
        ws = wf / np.where(s > 0, s, 1).astype(np.float32)
        self.nearest = np.clip(np.round(ws), qmin, qmax)
        self.floor = np.floor(ws)
        # the unit's max |W| fixes the step: those weights keep their nearest code
        self.fixed = (np.abs(self.nearest) >= qmax) | np.broadcast_to(s == 0, wf.shape)
        shape = wf.shape
        self._s = mx.nd.array(np.broadcast_to(s, shape))
        self._fl = mx.nd.array(self.floor)
        self.bias = mx.nd.array(bf)
        self._keep = mx.nd.array(1.0 - self.fixed)
        self._fixed_w = mx.nd.array(np.where(self.fixed, self.nearest * s, 0).astype(np.float32))
        self._lo = mx.nd.array(np.full(shape, qmin, np.float32))
        self._hi = mx.nd.array(np.full(shape, qmax, np.float32))
        self.v = mx.nd.array(init_v(ws - self.floor))
        self.v.attach_grad()
        self._h = None

    def weight(self, hard: bool = False):
        """``s * clip(floor + h(V), qmin, qmax)`` (h(V) >= 0.5 rounds up when ``hard``); fixed weights nearest."""
        h = (self.v >= 0) if hard else rectified_sigmoid(mx.nd, self.v)
        self._h = h
        code = mx.nd.broadcast_minimum(mx.nd.broadcast_maximum(self._fl + h, self._lo), self._hi)
        return code * self._s * self._keep + self._fixed_w

    def nearest_weight(self):
        return mx.nd.array((self.nearest * self.step).astype(np.float32))

    def penalty(self, beta: float):
        """``sum(1 - |2 h - 1|^beta)`` over the learnable weights, for the h of the last ``weight()``."""
        return mx.nd.sum((1 - mx.nd.power(mx.nd.abs(2 * self._h - 1), beta)) * self._keep)

    def codes(self) -> np.ndarray:
        return np.where(self.fixed, self.nearest,
                        np.clip(self.floor + (self.v.asnumpy() >= 0), self.qmin, self.qmax)).astype(np.int32)

    def write(self, path: str, net: gluon.Block) -> np.ndarray:
        """Store the learned codes as the layer's weights (``net``: the quantized net, whose cached graphs are
        cleared); raises where the layer does not round them back."""
        from deployq.api import _clear_cache

        codes = self.codes()
        set_folded_weight(self.blk, (codes * self.step).astype(np.float32))
        _clear_cache(net)
        got = weight_codes(self.blk).reshape(codes.shape)
        if not np.array_equal(got, codes):
            raise RuntimeError(f"layer {path}: {int(np.sum(got != codes))} weight code(s) differ from the learned "
                               "ones after writing")
        return codes

    def changed(self) -> float:
        return float(np.mean(self.codes() != self.nearest))


class Adam:
    """Adam on a list of NDArrays with gradients (in place)."""

    def __init__(self, params: list, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.params, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, b1, b2, eps, 0
        self.m = [mx.nd.zeros_like(p) for p in params]
        self.u = [mx.nd.zeros_like(p) for p in params]

    def step(self) -> None:
        self.t += 1
        b1, b2 = self.b1, self.b2
        for p, m, u in zip(self.params, self.m, self.u, strict=True):
            gr = p.grad
            m[:] = b1 * m + (1 - b1) * gr
            u[:] = b2 * u + (1 - b2) * gr * gr
            p[:] = p - self.lr * (m / (1 - b1 ** self.t)) / (mx.nd.sqrt(u / (1 - b2 ** self.t)) + self.eps)


def adaround(qnet: gluon.HybridBlock, x: np.ndarray, config: AdaRoundConfig | None = None,
             layers: list[str] | None = None, quiet: bool = True, reference: Any = None,
             diagnose: bool = False) -> dict[str, Any]:
    """Learn the weight rounding of every quantized layer (or ``layers``) of ``qnet`` in place, in network order,
    on calibration images ``x`` (the input ranges must be set: calibrate first). Returns per layer the share of
    codes changed and the seconds taken; with ``diagnose``, also the output MSE with nearest and with learned
    rounding (on ``x``; two extra passes per layer).
    ``reference``: the fp32 graph IR to reconstruct (default: the net's float graph now; pass the one taken
    before an earlier pass that changed the stored floats, such as bias correction). The activations are
    computed once, layer after layer (``deployq.calib.ptq.recon``)."""
    from .recon import layer_units, reconstruct

    return reconstruct(qnet, x, config or AdaRoundConfig(), layer_units, layers=layers, quiet=quiet,
                       reference=reference, desc="adaround", fp32_drop=True, diagnose=diagnose)
