"""What the PTQ passes share: a layer's geometry and fp32 tensors from the exporters' fp32 graph IR (BN folded,
fusable activations marked), its simulated input (upstream layers quantized) and its forward in MXNet ``F``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

ACTIVATIONS = ("relu", "relu6")


def fp32_graph(net: gluon.HybridBlock, image_shape: tuple[int, ...]) -> Any:
    """The net's fp32 graph IR (a quantized net's float graph), BN folded, fusable activations marked."""
    from deployq.exporters.ir.frontend import from_gluon
    from deployq.exporters.ir.passes import optimize

    return optimize(from_gluon(net, (1, *image_shape)))


def fp32_tensors(g: Any, x: np.ndarray, tensors: list[str], batch_size: int = 128) -> dict[str, np.ndarray]:
    """``{tensor: fp32 value over x}`` from the graph IR."""
    from deployq.exporters.ir.mxnet_lower import run

    names = sorted(set(tensors))
    return run(g, x, outputs=names, batch_size=batch_size)


def activation_of(node: Any) -> str | None:
    """The activation fused after the layer (``relu``/``relu6``) where the IR marks one, else None."""
    kind = node.attrs.get("fusable_activation")
    return kind if kind in ACTIVATIONS else None


def layer_forward(F, node: Any, x, w, b, act: str | None = None):
    """The layer of IR ``node`` (Convolution / FullyConnected) on ``x`` with weight ``w`` and bias ``b``, then
    ``act``."""
    a = node.attrs
    if node.op == "Convolution":
        y = F.Convolution(x, w, b, kernel=a["kernel"], stride=a["stride"], dilate=a["dilate"], pad=a["pad"],
                          num_filter=a["num_filter"], num_group=a["num_group"], no_bias=b is None)
    else:
        y = F.FullyConnected(x, w, b, num_hidden=a["num_hidden"], flatten=a["flatten"], no_bias=b is None)
    if act == "relu":
        y = F.relu(y)
    elif act == "relu6":
        y = F.clip(y, 0.0, 6.0)
    return y


class _Stop(Exception):
    pass


@contextlib.contextmanager
def imperative(net: gluon.Block) -> Iterator[None]:
    """Run ``net`` block by block (no cached graph), so that forward hooks of inner blocks fire; restores each
    block's hybridization afterwards."""
    from deployq.naming import block_paths

    blocks = [b for b in block_paths(net).values() if isinstance(b, gluon.HybridBlock)]
    saved = [(b, b._active) for b in blocks]
    for b in blocks:
        b._active = False
        b._clear_cached_op()
    try:
        yield
    finally:
        for b, active in saved:
            b._active = active
            b._clear_cached_op()


def raw_input(qnet: gluon.HybridBlock, path: str, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The input of quantized layer ``path`` in the simulated net (every layer before it quantized), before the
    layer's own input quantization; the forward stops at the layer."""
    from deployq.api import quant_layers

    blk = quant_layers(qnet)[path]
    got: list[np.ndarray] = []

    def hook(_b, inputs):
        got.append(inputs[0].asnumpy())
        raise _Stop

    h = blk.register_forward_pre_hook(hook)
    try:
        with imperative(qnet), mx.autograd.predict_mode():
            for i in range(0, len(x), batch_size):
                try:
                    qnet(mx.nd.array(x[i:i + batch_size]))
                except _Stop:
                    pass
    finally:
        h.detach()
    return np.concatenate(got)


def quantize_input(blk: Any, x: mx.nd.NDArray, bounds: tuple[Any, Any] | None = None) -> mx.nd.NDArray:
    """``x`` as the quantized layer ``blk`` quantizes its input (its fused ReLU, its calibrated range and
    grid), with the layer's own quantizer; ``bounds``: (lo, hi) NDArrays of shape (1,) in place of the range."""
    cfg = blk.layer_config
    if cfg.input_relu:
        x = mx.nd.relu(x)
    if cfg.input is None:
        return x
    if bounds is None:
        lo, hi = blk.input_range()
        bounds = (mx.nd.array([lo]), mx.nd.array([hi]))
    p = {k: v.data() for k, v in blk._reg_params.items()}
    return blk.quantizer.quantize_input(mx.nd, x, bounds[0], bounds[1], p)


def simulated_input(qnet: gluon.HybridBlock, path: str, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The fake-quantized input of layer ``path`` exactly as the simulated net feeds its Conv/Dense."""
    from deployq.api import quant_layers

    blk = quant_layers(qnet)[path]
    raw = raw_input(qnet, path, x, batch_size)
    out = [quantize_input(blk, mx.nd.array(raw[i:i + batch_size])).asnumpy() for i in range(0, len(raw), batch_size)]
    return np.concatenate(out)


def weight_grid_step(blk: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(W_f, step per output channel broadcastable against W_f, qmin, qmax) of a quantized layer's weight."""
    wf, _ = blk.folded_weight_bias()
    _, step = blk.quantized_weight()
    g = blk.layer_config.weight
    return wf, step.reshape((-1,) + (1,) * (wf.ndim - 1)).astype(np.float32), g.qmin, g.qmax


def weight_codes(blk: Any) -> np.ndarray:
    """The layer's integer weight codes as the exporters compute them (``round(W_q / step)``)."""
    wq, step = blk.quantized_weight()
    s = np.where(step > 0, step, 1).reshape((-1,) + (1,) * (wq.ndim - 1))
    return np.round(wq / s).astype(np.int32)


def set_folded_weight(blk: Any, target: np.ndarray) -> None:
    """Store weights so that the layer's BN-folded weight is ``target`` (float32): the raw weight for a plain
    layer, ``target / k`` (k = gamma / sqrt(var + eps), as the layer folds) for a fake-BN layer; a channel with
    k == 0 keeps its weights."""
    target = np.asarray(target, np.float32)
    kw = blk._dq_bn_kwargs
    if kw is None:
        blk.weight.set_data(mx.nd.array(target))
        return
    rv = blk.fakebn_var.data().astype("float32")
    g = blk._reg_params["bn_gamma"].data()
    gamma = mx.nd.ones_like(g) if kw.get("fix_gamma", False) else g
    k = (gamma / mx.nd.sqrt(rv + kw.get("eps", 1e-5))).asnumpy().reshape((-1,) + (1,) * (target.ndim - 1))
    old = blk.weight.data().asnumpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(k != 0, target / np.where(k != 0, k, 1), old).astype(np.float32)
    blk.weight.set_data(mx.nd.array(raw))


def add_folded_bias(blk: Any, delta: np.ndarray) -> bool:
    """Add ``delta`` (per output channel) to the layer's BN-folded bias: to BN's beta for a fake-BN layer, else
    to the layer's bias. False where the layer has neither (nothing changed)."""
    delta = np.asarray(delta, np.float32)
    if blk._dq_bn_kwargs is not None:
        prm = blk._reg_params["bn_beta"]
    elif blk.bias is not None:
        prm = blk.bias
    else:
        return False
    prm.set_data(prm.data() + mx.nd.array(delta))
    return True
