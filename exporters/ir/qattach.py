"""Attach the quantization of each Conv/Dense node to the IR, exactly as deployq simulated it.

After ``passes.optimize`` (BN folded), every quantized node gets ``node.attrs["wq"]`` (:class:`WeightQuant`)
and ``node.attrs["iq"]`` (:class:`InputQuant`, when its input is quantized); a layer whose output is quantized
(with a trained or calibrated range) also gets ``node.attrs["oq"]`` (an :class:`InputQuant` record of the output
grid) and ``node.attrs["oq_tensor"]`` (the tensor it quantizes: the node's output, or the output of the ReLU
that follows it, see :func:`output_tensor`); so does the node producing a block output that the net quantizes
(``deployq.api.output_quantizers``: a residual block's ``relu(body(x) + shortcut)``). Exporters that do not
quantize outputs ignore these two.
Two sources:

- :func:`attach_qnet`: a deployq-quantized Gluon net. The folded weights and biases are replaced by the core's
  own (``blk.folded_weight_bias()``, the same MXNet ops as the simulation) so that integer codes are
  bit-identical to the simulation's.
- :func:`attach_scales`: a scale file (json/params route). Weights are quantized per output channel on the
  profile's grid from ``max|W_f|``; input thresholds come from the file.

Exporters derive their own convention from these records: ncnn multiplier ``qmax / threshold`` (float32),
Tengine/ONNX step ``threshold / qmax``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from deployq.exporters.ir.graph import Graph, GraphError

from deployq.fakequant import np_round_half_away
from deployq.profiles import Profile, load_profile

WEIGHTED = ("Convolution", "FullyConnected")


@dataclass(frozen=True)
class WeightQuant:
    """Per-output-channel symmetric weight grid: ``W_q = codes * step[c]``; ``amax = step * qmax`` (max|W_f|
    per channel for max-abs algorithms). ``codes`` are int32 in [qmin, qmax]."""

    codes: np.ndarray
    step: np.ndarray
    amax: np.ndarray
    qmin: int
    qmax: int
    bits: int
    granularity: str

    def multiplier(self) -> np.ndarray:
        """ncnn's weight scale per channel, ``qmax / amax`` in float32 (0 for a dead channel)."""
        with np.errstate(divide="ignore"):
            m = np.float32(self.qmax) / self.amax.astype(np.float32)
        return np.where(self.amax > 0, m, 0).astype(np.float32)


@dataclass(frozen=True)
class InputQuant:
    """Per-tensor input grid of one layer. Symmetric: ``q = round(x / step)``, ``step = threshold / qmax``;
    affine (uint8): ``q = round(x / step) + zero_point``."""

    threshold: float
    lo: float
    hi: float
    bits: int
    signed: bool
    symmetric: bool
    qmin: int
    qmax: int
    step: float
    zero_point: int = 0

    def multiplier(self) -> np.float32:
        """ncnn's input scale, ``qmax / threshold`` in float32 (1 where the threshold is 0, as simulated)."""
        t = np.float32(self.threshold)
        return np.float32(self.qmax) / t if t > 0 else np.float32(1)


def _input_quant(lo: float, hi: float, bits: int, signed: bool, symmetric: bool, qmin: int, qmax: int
                 ) -> InputQuant:
    if symmetric:
        t = float(np.float32(max(abs(lo), abs(hi)) if signed else max(hi, 0.0)))
        return InputQuant(t, lo, hi, bits, signed, True, qmin, qmax, (t / qmax) if t > 0 else 1.0, 0)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    step = float(np.float32(hi0 - lo0) / np.float32(qmax - qmin)) if hi0 > lo0 else 1.0
    zp = int(np.clip(np.round(qmin - lo0 / step), qmin, qmax))
    return InputQuant(max(abs(lo0), hi0), lo, hi, bits, signed, False, qmin, qmax, step, zp)


def weight_quant_maxabs(w: np.ndarray, bits: int = 8, qmax: int | None = None, groups: int = 1) -> WeightQuant:
    """Per-output-channel max-abs quantization of ``w`` (the engines' own rule); with ``1 < groups < channels``
    per group of output channels instead (one max-abs per group, repeated on its channels)."""
    qmax = qmax or 2 ** (bits - 1) - 1
    amax = np.abs(w.reshape(w.shape[0], -1)).max(1).astype(np.float32)
    per_group = 1 < groups < len(amax)
    if per_group:
        amax = np.repeat(amax.reshape(groups, -1).max(1), len(amax) // groups)
    mult = np.where(amax > 0, np.float32(qmax) / np.where(amax > 0, amax, 1), 1).astype(np.float32)
    shape = (-1,) + (1,) * (w.ndim - 1)
    # np_quantize's multiplier convention takes the step and multiplies by its reciprocal; ncnn computes
    # round(w * multiplier) with the multiplier itself, so round here directly (half away from zero).
    codes = np.clip(np_round_half_away(w.astype(np.float32) * mult.reshape(shape)), -qmax, qmax).astype(np.int32)
    return WeightQuant(codes, (amax / np.float32(qmax)).astype(np.float32), amax, -qmax, qmax, bits,
                       "group" if per_group else "channel")


def _set_weights(g: Graph, node, w: np.ndarray, b: np.ndarray) -> None:
    g.params[node.params["weight"]] = w.astype(np.float32)
    if "bias" not in node.params:
        node.params["bias"] = f"{node.name}.bias"
        node.attrs["no_bias"] = False
    g.params[node.params["bias"]] = b.astype(np.float32)


def output_tensor(g: Graph, node, after_activation: bool) -> str:
    """The tensor a layer's output quantization applies to: ``node``'s output, or with ``after_activation``
    the output of the activation fused after it (``passes.mark_fusable_activations``)."""
    if not after_activation:
        return node.output
    act = [n for n in g.consumers(node.output) if n.attrs.get("fusable_into") == node.name]
    if len(act) != 1:
        raise GraphError(f"layer {node.name}: its output is quantized after its activation, but the graph has no "
                         f"activation fused after it (run passes.optimize first)")
    return act[0].output


def attach_qnet(g: Graph, qnet: Any, check_tol: float = 1e-3) -> Graph:
    """Copy of ``g`` (already optimized) with the quantized net's exact folded weights, codes and input grids."""
    from deployq.api import output_quantizers, quant_layers

    g = g.copy()
    for path, blk in quant_layers(qnet).items():
        try:
            node = g.node(path)
        except KeyError:
            raise GraphError(f"quantized layer {path!r} has no node in the graph (nodes: "
                             f"{', '.join(n.name for n in g.nodes if n.op in WEIGHTED)})") from None
        if node.op not in WEIGHTED:
            raise GraphError(f"quantized layer {path!r} is a {node.op} node in the graph")
        wf, bf = blk.folded_weight_bias()
        have = g.param(node, "weight")
        if have is not None and have.shape == wf.shape and check_tol is not None:
            err = np.abs(have - wf).max() / max(1e-12, np.abs(wf).max())
            if err > check_tol:
                raise GraphError(f"layer {path}: the graph's folded weights differ from the quantized net's "
                                 f"(relative {err:.2e}); was a BatchNorm folded differently?")
        _set_weights(g, node, wf.reshape(have.shape if have is not None else wf.shape), bf)
        cfg = blk.layer_config
        if cfg.weight is not None:
            wq, step = blk.quantized_weight()
            shape = (-1,) + (1,) * (wq.ndim - 1)
            codes = np.round(wq / np.where(step > 0, step, 1).reshape(shape)).astype(np.int32)
            amax = blk.quantizer.weight_threshold(wf, step)
            node.attrs["wq"] = WeightQuant(codes, step.astype(np.float32), amax, cfg.weight.qmin,
                                           cfg.weight.qmax, cfg.weight.bits, cfg.weight.granularity)
        if cfg.input is not None:
            lo, hi = blk.input_range()
            gi = cfg.input
            node.attrs["iq"] = _input_quant(lo, hi, gi.bits, gi.signed, gi.symmetric, gi.qmin, gi.qmax)
        out_range = blk.output_range() if cfg.output is not None else None
        if out_range is not None:
            go = cfg.output
            node.attrs["oq"] = _input_quant(*out_range, go.bits, go.signed, go.symmetric, go.qmin, go.qmax)
            node.attrs["oq_tensor"] = output_tensor(g, node, cfg.output_relu or blk.act is not None)
        node.attrs["quant_layer"] = path
    for path, q in output_quantizers(qnet).items():
        out_range = q.output_range()
        if out_range is None:
            continue
        t = g.resolve(q.tensor)
        node = g.producer(t)
        if node is None or "oq" in node.attrs:
            raise GraphError(f"block {path}: its quantized output {q.tensor!r} is not a node output of the graph")
        go = q.layer_config.output
        node.attrs["oq"] = _input_quant(*out_range, go.bits, go.signed, go.symmetric, go.qmin, go.qmax)
        node.attrs["oq_tensor"] = t
    return g


def attach_scales(g: Graph, scales: dict[str, Any], profile: str | Profile | None = None) -> Graph:
    """Copy of ``g`` (already optimized) quantized from a scale file: every layer with an ``<layer>:input``
    entry gets max-abs per-channel weights on the profile's grid (per group for a grouped conv where the profile's
    ``grouped_granularity`` is ``group``, as ``deployq.quantize`` does) and the file's input grid."""
    prof = load_profile(profile or scales.get("profile") or "ncnn")
    g = g.copy()
    layers = scales.get("layers", {})
    for key, e in scales["tensors"].items():
        if e.get("kind") != "input":
            continue
        layer = e.get("layer") or key.rsplit(":", 1)[0]
        try:
            node = g.node(layer)
        except KeyError:
            raise GraphError(f"scale file entry {key!r}: the graph has no layer {layer!r}") from None
        bits = int((layers.get(layer) or {}).get("weight_bits") or prof.weight.bits)
        w = g.param(node, "weight")
        groups = int(node.attrs.get("num_group", 1)) if node.op == "Convolution" else 1
        node.attrs["wq"] = weight_quant_maxabs(w, bits, groups=groups if prof.weight.grouped_granularity == "group"
                                               else 1)
        signed = bool(e.get("signed", True))
        symmetric = bool(e.get("symmetric", True))
        ebits = int(e.get("bits", 8))
        qmax = 2 ** (ebits - 1) - 1 if signed else 2 ** ebits - 1
        qmin = (-qmax if signed else 0)
        node.attrs["iq"] = _input_quant(float(e.get("lo", -e["threshold"])), float(e.get("hi", e["threshold"])),
                                        ebits, signed, symmetric, qmin, qmax)
        if symmetric:  # the file's threshold is authoritative
            iq = node.attrs["iq"]
            t = float(np.float32(e["threshold"]))
            node.attrs["iq"] = InputQuant(t, iq.lo, iq.hi, ebits, signed, True, qmin, qmax, t / qmax if t else 1.0)
        node.attrs["quant_layer"] = layer
    return g
