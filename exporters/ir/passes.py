"""Graph passes: plain ``Graph -> Graph`` functions that return a new graph and keep the fp32 outputs."""

from __future__ import annotations

import numpy as np
from deployq.exporters.ir.graph import Graph, Node
from deployq.exporters.ir.normalize import normalize

WEIGHTED_OPS = ("Convolution", "FullyConnected")


def activation_kind(n: Node) -> str | None:
    """``relu``/``relu6``/``sigmoid``/``tanh``/``leaky`` for an activation node, else None."""
    if n.op == "Activation" and n.attrs["act_type"] in ("relu", "sigmoid", "tanh"):
        return n.attrs["act_type"]
    if n.op == "clip" and n.attrs["a_min"] == 0.0 and n.attrs["a_max"] == 6.0:
        return "relu6"
    if n.op == "LeakyReLU" and n.attrs["act_type"] == "leaky":
        return "relu" if n.attrs["slope"] == 0.0 else "leaky"
    return None


def foldable_batchnorm(g: Graph, bn: Node) -> Node | None:
    """The Conv/FC that ``bn`` can be folded into: the producer of its input, when BN is that tensor's only
    use, BN normalises channels (axis 1) and runs on global statistics in inference. Else None."""
    prod = g.producer(bn.inputs[0])
    if prod is None or prod.op not in WEIGHTED_OPS or bn.attrs["axis"] != 1:
        return None
    return prod if g.n_uses(bn.inputs[0]) == 1 else None


def fold_batchnorm(g: Graph) -> Graph:
    """Fold each BatchNorm into the Conv/FC that feeds it (BN's own eps and fix_gamma):
    ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    A BN whose input tensor has another consumer (fan-out), or a second BN after an already folded one (the
    quantized net folds one), stays. The folded tensor keeps the conv's name;
    ``g.aliases`` maps the BN's name to it.
    """
    g = g.copy()
    for bn in [n for n in g.nodes if n.op == "BatchNorm"]:
        conv = foldable_batchnorm(g, bn)
        if conv is None or "folded_bn" in conv.attrs:  # one BN per conv, as deployq.quantize folds them
            continue
        gamma = np.ones_like(g.param(bn, "gamma")) if bn.attrs["fix_gamma"] else g.param(bn, "gamma")
        var = g.param(bn, "moving_var").astype(np.float64)
        inv = gamma.astype(np.float64) / np.sqrt(var + bn.attrs["eps"])
        w = g.param(conv, "weight").astype(np.float64)
        b = g.param(conv, "bias")
        b = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        w_f = w * inv.reshape((-1,) + (1,) * (w.ndim - 1))
        b_f = (b - g.param(bn, "moving_mean")) * inv + g.param(bn, "beta")
        wkey = conv.params["weight"]
        bkey = conv.params.get("bias") or f"{conv.name}.bias"
        g.params[wkey] = w_f.astype(np.float32)
        g.params[bkey] = b_f.astype(np.float32)
        conv.params["bias"] = bkey
        conv.attrs["no_bias"] = False
        conv.attrs["folded_bn"] = bn.name
        g.replace_uses(bn.output, conv.output)
        g.remove(bn)
    return g


def drop_dropout(g: Graph) -> Graph:
    """Remove Dropout nodes (identity in inference)."""
    g = g.copy()
    for n in [n for n in g.nodes if n.op == "Dropout"]:
        g.replace_uses(n.output, n.inputs[0])
        g.remove(n)
    return g


def mark_fusable_activations(g: Graph) -> Graph:
    """Annotate an activation that directly follows a Conv/FC whose output has no other use:
    ``conv.attrs['fusable_activation'] = kind`` and ``act.attrs['fusable_into'] = conv.name``. Nothing is
    removed; exporters decide whether to fuse."""
    g = g.copy()
    for act in g.nodes:
        kind = activation_kind(act)
        prod = g.producer(act.inputs[0]) if kind else None
        if prod is None or prod.op not in WEIGHTED_OPS or g.n_uses(act.inputs[0]) != 1:
            continue
        prod.attrs["fusable_activation"] = kind
        act.attrs["fusable_into"] = prod.name
    return g


def optimize(g: Graph) -> Graph:
    """The standard pipeline: normalise MXNet idioms (``normalize``), drop Dropout, fold BatchNorm, mark
    fusable activations."""
    return mark_fusable_activations(fold_batchnorm(drop_dropout(normalize(g))))
