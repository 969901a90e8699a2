"""deployq's simulation of Tengine int8 at IR level: the lowered MXNet graph with Tengine's quantization.

Every Tengine tensor is fake-quantized with its step (``q = clamp(round_half_away(x / step), -127, 127)``;
MXNet ``round`` is half away from zero). Conv/FC run in Tengine's integer domain, as MXNet float32 ops on
integer codes (exact below 2**24): ``acc = conv(q_x, q_w) + q_b``, then Conv ``acc * (s_in * s_w[c])`` (a
fused ReLU/ReLU6 follows in float, then the output is requantized) and FC ``round(acc * (s_in * s_w / s_out))``.
Average pooling without padding sums codes, as Tengine does. Weights are already on the per-channel grid.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
from deployq.exporters.ir.graph import Graph, Node
from deployq.exporters.ir.mxnet_lower import NodeHook, run, tensor_shapes
from deployq.exporters.tengine.lower import QMAX, TengineExport, round_half_away, weight_codes

F32 = np.float32


def fake_quant(x: mx.sym.Symbol, step: float) -> mx.sym.Symbol:
    return mx.sym.clip(mx.sym.round(x / step), -QMAX, QMAX) * step


def _integer_graph(exp: TengineExport, step: dict[str, float]) -> Graph:
    """Copy of the lowered graph whose Conv/FC params are int8/int32 codes plus a per-channel dequant factor."""
    g = exp.graph.copy()
    for n in g.nodes:
        if n.op not in ("Convolution", "FullyConnected"):
            continue
        s_in, s_w = F32(step[exp.tensor_map[n.inputs[0]]]), exp.weight_steps[n.name]
        w = g.param(n, "weight")
        g.params[n.params["weight"]] = weight_codes(w, s_w).astype(F32)
        b = g.param(n, "bias")
        s_b = (s_w * s_in).astype(F32)
        if b is not None:
            safe = np.where(s_b == 0, F32(1), s_b)
            g.params[n.params["bias"]] = np.where(s_b == 0, 0, round_half_away(b / safe)).astype(F32)
        if n.op == "Convolution":
            factor = (s_in * s_w).astype(F32).reshape(1, -1, 1, 1)
        else:
            factor = (s_in * s_w / F32(step[exp.tensor_map[n.output]])).astype(F32).reshape(1, -1)
        key = f"{n.name}.dequant"
        g.params[key] = factor
        n.params["dequant"] = key
    return g


def _lower_int(exp: TengineExport, step: dict[str, float]) -> NodeHook:
    shapes = tensor_shapes(exp.graph)

    def lower_node(n: Node, xs: list[mx.sym.Symbol], ps: dict[str, mx.sym.Symbol]) -> mx.sym.Symbol | None:
        a = n.attrs
        if n.op in ("Convolution", "FullyConnected"):
            xq = mx.sym.round(xs[0] / step[exp.tensor_map[n.inputs[0]]])
            if n.op == "Convolution":
                acc = mx.sym.Convolution(xq, ps["weight"], ps.get("bias"), kernel=a["kernel"],
                                         stride=a["stride"], dilate=a["dilate"], pad=a["pad"],
                                         num_filter=a["num_filter"], num_group=a["num_group"],
                                         no_bias="bias" not in ps)
                return mx.sym.broadcast_mul(acc, ps["dequant"])
            acc = mx.sym.FullyConnected(xq, ps["weight"], ps.get("bias"), num_hidden=a["num_hidden"],
                                        no_bias="bias" not in ps, flatten=a["flatten"])
            q = mx.sym.clip(mx.sym.round(mx.sym.broadcast_mul(acc, ps["dequant"])), -QMAX, QMAX)
            return q * step[exp.tensor_map[n.output]]
        if n.op == "Pooling" and a["pool_type"] == "avg" and (a["global_pool"] or (
                not any(a["pad"]) and a["pooling_convention"] == "valid")):
            s_in = step[exp.tensor_map[n.inputs[0]]]
            xq = mx.sym.round(xs[0] / s_in)
            total = mx.sym.Pooling(xq, kernel=a["kernel"] or (1, 1), stride=a["stride"], pool_type="sum",
                                   global_pool=a["global_pool"])
            kh, kw = shapes[n.inputs[0]][2:] if a["global_pool"] else a["kernel"]
            return total * s_in / float(kh * kw)
        return None

    return lower_node


def simulate(exp: TengineExport, x: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Dequantized output of the Tengine int8 model ``exp`` on NumPy images ``x`` (first graph output)."""
    # the steps as Tengine reads them: the scale file's "%.9g" text parsed to float32
    step = {r.tensor: float(np.float32(f"{r.step:.9g}")) for r in exp.scales}
    g = _integer_graph(exp, step)

    def hook(t: str, s: mx.sym.Symbol) -> mx.sym.Symbol:
        return fake_quant(s, step[exp.tensor_map[t]]) if t in exp.tensor_map else s

    return run(g, x, hook=hook, batch_size=batch_size, lower_node=_lower_int(exp, step))[g.outputs[0]]
