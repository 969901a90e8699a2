"""deployq's simulation of Tengine int8 at IR level: the lowered MXNet graph with Tengine's quantization.

Every Tengine tensor is fake-quantized with its step (``q = clamp(round_half_away(x / step), -127, 127)``;
MXNet ``round`` is half away from zero). Conv/FC run in Tengine's integer domain, as MXNet float32 ops on
integer codes (exact below 2**24): ``acc = conv(q_x, q_w) + q_b``, then Conv ``(acc * s_in) * s_w[c]`` (two
float32 products, as Tengine's x86 kernels compute; ``acc * (s_in * s_w[c])`` where the reference kernel runs,
``kernels.py``; a fused ReLU/ReLU6 follows in float, then the output is
requantized) and FC ``round(acc * (s_in * s_w / s_out))``. Pooling works on codes as Tengine's int8 kernel
does (max: ``max_q * (s_in / s_out)``; avg: ``sum_q * s_in / n``). Weights are already on the per-channel grid.
Reshape, nearest UpSampling and elemwise_mul (``shape_ops.py``) need no hook: Tengine dequantizes, copies or
multiplies in float32 and requantizes, the same float operations as MXNet on fake-quantized tensors.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
from deployq.exporters.ir.graph import Graph, Node
from deployq.exporters.ir.mxnet_lower import NodeHook, run, tensor_shapes
from deployq.exporters.tengine.kernels import conv_kernel, two_step_dequant
from deployq.exporters.tengine.lower import QMAX, TengineExport, round_half_away, weight_codes

F32 = np.float32


def fake_quant(x: mx.sym.Symbol, step: float) -> mx.sym.Symbol:
    return mx.sym.clip(mx.sym.round(x / step), -QMAX, QMAX) * step


def _integer_graph(exp: TengineExport, step: dict[str, float]) -> Graph:
    """Copy of the lowered graph whose Conv/FC params are int8/int32 codes plus a per-channel dequant factor."""
    g = exp.graph.copy()
    shapes = tensor_shapes(g)
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
        if n.op == "Convolution" and two_step_dequant(conv_kernel(n.attrs, shapes[n.inputs[0]][1], w.shape[0])):
            # the x86 kernels: ((float)acc * s_in) * s_w[c], two float32 products
            factors = {"in_step": np.full((1, 1, 1, 1), s_in, F32), "w_step": s_w.astype(F32).reshape(1, -1, 1, 1)}
        elif n.op == "Convolution":  # conv_kernel_ref_int8.c (grouped convs): acc * (s_in * s_w[c])
            factors = {"dequant": (s_in * s_w).astype(F32).reshape(1, -1, 1, 1)}
        else:  # fc_ref.c: acc * ((s_in * s_w[c]) / s_out)
            factors = {"dequant": (s_in * s_w / F32(step[exp.tensor_map[n.output]])).astype(F32).reshape(1, -1)}
        for role, value in factors.items():
            g.params[f"{n.name}.{role}"] = value
            n.params[role] = f"{n.name}.{role}"
    return g


def _pool(n: Node, x: mx.sym.Symbol, s_in: float, s_out: float, shape: tuple[int, ...]) -> mx.sym.Symbol:
    """Tengine's int8 pooling (``pooling_kernel_ref_int8.c``) on the codes ``round(x / s_in)``: max ->
    ``max_q * (s_in / s_out)``, avg -> ``(sum_q * s_in) / pool_size`` with the kernel's pool size (real pixels;
    with ``pooling_convention`` full, Tengine's caffe flavour, also the padding up to ``in + pad``)."""
    a = n.attrs
    xq = mx.sym.round(x / s_in)
    glob = a["global_pool"] or (tuple(a["kernel"]) == tuple(shape[2:]) and not any(a["pad"]))
    geo = {"kernel": shape[2:] if glob else a["kernel"], "stride": (1, 1) if glob else a["stride"],
           "pad": (0, 0) if glob else a["pad"],
           "pooling_convention": "valid" if glob else a["pooling_convention"]}
    if a["pool_type"] == "max":
        q = mx.sym.Pooling(xq, pool_type="max", **geo) * float(np.float32(s_in) / np.float32(s_out))
        return mx.sym.clip(mx.sym.round(q), -QMAX, QMAX) * s_out
    total = mx.sym.Pooling(xq, pool_type="sum", **geo) * s_in
    ones = mx.sym.ones_like(xq)
    real = mx.sym.Pooling(ones, pool_type="sum", **geo)
    if geo["pooling_convention"] == "full" and any(geo["pad"]):  # count = real / (real / count_with_pad)
        frac = mx.sym.Pooling(ones, pool_type="avg", count_include_pad=True, **geo)
        real = mx.sym.round(real / frac)
    return mx.sym.broadcast_div(total, real)


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
                if "dequant" in ps:
                    return mx.sym.broadcast_mul(acc, ps["dequant"])
                return mx.sym.broadcast_mul(mx.sym.broadcast_mul(acc, ps["in_step"]), ps["w_step"])
            acc = mx.sym.FullyConnected(xq, ps["weight"], ps.get("bias"), num_hidden=a["num_hidden"],
                                        no_bias="bias" not in ps, flatten=a["flatten"])
            q = mx.sym.clip(mx.sym.round(mx.sym.broadcast_mul(acc, ps["dequant"])), -QMAX, QMAX)
            return q * step[exp.tensor_map[n.output]]
        if n.op == "Pooling":
            return _pool(n, xs[0], step[exp.tensor_map[n.inputs[0]]], step[exp.tensor_map[n.output]],
                         shapes[n.inputs[0]])
        if n.op == "Concat":  # concat_kernel_ref_int8.c: roundf(q * (s_in / s_out)), < -127 -> +127 (its bug)
            s_out = step[exp.tensor_map[n.output]]
            parts = []
            for t, x in zip(n.inputs, xs, strict=True):
                s_in = step[exp.tensor_map[t]]
                r = mx.sym.round(mx.sym.round(x / s_in) * float(np.float32(s_in) / np.float32(s_out)))
                parts.append(mx.sym.where(r < -QMAX, mx.sym.ones_like(r) * QMAX, mx.sym.minimum(r, QMAX)))
            return mx.sym.Concat(*parts, dim=a["dim"], num_args=len(parts)) * s_out
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
