"""deployq's simulation of Tengine int8 at IR level: the lowered MXNet graph with fake quantization.

Every Tengine tensor is fake-quantized with its step (``q = clamp(round_half_away(x / step), -127, 127)``,
MXNet ``round`` is half away from zero); a ReLU/ReLU6 fused into its conv is applied before the conv's
output is quantized; weights are already on the per-channel grid; biases go on Tengine's int32 grid
``s_w * s_in``.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np

from .mxnet_lower import run
from .tengine import QMAX, TengineExport, round_half_away


def fake_quant(x: mx.sym.Symbol, step: float) -> mx.sym.Symbol:
    return mx.sym.clip(mx.sym.round(x / step), -QMAX, QMAX) * step


def simulate(exp: TengineExport, x: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Dequantized output of the Tengine int8 model ``exp`` on NumPy images ``x`` (first graph output)."""
    g = exp.graph.copy()
    step = {r.tensor: r.step for r in exp.scales}
    for n in g.nodes:
        if n.op in ("Convolution", "FullyConnected") and "bias" in n.params:
            s_in = np.float32(step[exp.tensor_map[n.inputs[0]]])
            s_b = (exp.weight_steps[n.name] * s_in).astype(np.float32)
            b = g.param(n, "bias")
            safe = np.where(s_b == 0, np.float32(1), s_b)
            b_q = np.where(s_b == 0, 0, round_half_away(b / safe) * s_b)
            g.params[n.params["bias"]] = b_q.astype(np.float32)

    def hook(t: str, s: mx.sym.Symbol) -> mx.sym.Symbol:
        return fake_quant(s, step[exp.tensor_map[t]]) if t in exp.tensor_map else s

    return run(g, x, hook=hook, batch_size=batch_size)[g.outputs[0]]
