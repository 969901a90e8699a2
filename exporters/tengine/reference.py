"""NumPy reference of Tengine's int8 CPU arithmetic, run on exported files (json/params + scale table).

Follows the kernels an x86 build of Tengine runs (``tengine-int8.md`` §3.4/§5): weights re-quantized the way
quant_tool_int8 does (``s_w = max|w|/127`` per output channel, ``q = round(w/s_w)``, bias ``round(b / (s_w*s_in))``
as int32); Conv: int32 accumulate + bias, float dequant ``((float)acc * s_in) * s_w[c]`` (two float32 products)
in the x86 kernels, ``acc * (s_in*s_w[c])`` in the reference kernel that grouped convs get (``kernels.py``; the
model is of batch-1 runs, as an app runs Tengine), fused ReLU/ReLU6 in float, ``round`` half away from zero,
clamp +-127; FC (``fc_ref.c``): ``(acc + bias) * ((s_in*s_w)/s_out)``; pooling (``pooling_kernel_ref_int8.c``),
eltwise, concat, flatten and standalone activations as listed there; Reshape, nearest UpSampling and elemwise_mul
in ``shape_ops.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from deployq.exporters.ir.frontend import from_files
from deployq.exporters.ir.graph import Graph, GraphError, Node
from deployq.exporters.tengine.kernels import conv_kernel, two_step_dequant
from deployq.exporters.tengine.lower import QMAX, round_half_away, weight_codes, weight_steps
from deployq.exporters.tengine.shape_ops import REFERENCE
from numpy.lib.stride_tricks import sliding_window_view

F32 = np.float32


def read_scale_table(path: str | Path) -> dict[str, float]:
    """``<tensor> <scale> <zero_point>`` lines -> ``{tensor: step}`` (zero points must be 0 for int8)."""
    out = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, rest = line.split(" ", 1)
        if int(rest.rsplit(" ", 1)[-1]) != 0:
            raise GraphError(f"{path}:{i}: non-zero zero point for tensor {name!r}")
        out[name] = float(rest.rsplit(" ", 1)[0])
    return out


def _requant(v: np.ndarray, s_out: float) -> np.ndarray:
    return np.clip(round_half_away(v.astype(F32) / F32(s_out)), -QMAX, QMAX).astype(np.int8)


def _conv_acc(xq: np.ndarray, wq: np.ndarray, a: dict) -> np.ndarray:
    """int32-exact accumulation of a grouped 2-D convolution (float BLAS on integers, exact below 2**24 or
    in float64)."""
    (ph, pw), (sh, sw), groups = a["pad"], a["stride"], a["num_group"]
    o, cg, kh, kw = wq.shape
    n = xq.shape[0]
    dtype = np.float32 if cg * kh * kw * QMAX * QMAX < 2 ** 24 else np.float64
    xp = np.pad(xq.astype(dtype), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]  # N,C,Ho,Wo,kh,kw
    ho, wo = win.shape[2:4]
    w = wq.astype(dtype)
    if cg == 1 and o == groups:  # depthwise
        acc = np.einsum("nchwij,cij->nchw", win, w[:, 0])
    else:
        og = o // groups
        parts = []
        for gi in range(groups):
            cols = win[:, gi * cg:(gi + 1) * cg].transpose(0, 2, 3, 1, 4, 5)
            cols = cols.reshape(n * ho * wo, cg * kh * kw)
            parts.append((cols @ w[gi * og:(gi + 1) * og].reshape(og, -1).T).reshape(n, ho, wo, og))
        acc = np.concatenate(parts, axis=3).transpose(0, 3, 1, 2)
    return acc.astype(np.int64)


def _pool(q: np.ndarray, a: dict, s_in: float, s_out: float) -> np.ndarray:
    """``pooling_kernel_ref_int8.c``: max -> ``round(max_q * (s_in / s_out))``; avg -> ``round(((sum_q * s_in) /
    pool_size) / s_out)``, pool_size = the real pixels, or with the caffe flavour (``pooling_convention`` full)
    the window clipped to ``in + pad`` only. A window equal to the unpadded input is global pooling."""
    x = q.astype(np.float64)
    h, w = x.shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"] or (h, w), a["stride"] or (1, 1), a["pad"] or (0, 0)
    if a["global_pool"] or ((kh, kw) == (h, w) and not (ph or pw)):
        (kh, kw), (sh, sw), (ph, pw), ceil = (h, w), (1, 1), (0, 0), False
    else:
        ceil = a["pooling_convention"] == "full"
    ho = (-(-(h + 2 * ph - kh) // sh) if ceil else (h + 2 * ph - kh) // sh) + 1
    wo = (-(-(w + 2 * pw - kw) // sw) if ceil else (w + 2 * pw - kw) // sw) + 1
    eh, ew = max(0, (ho - 1) * sh + kh - h - 2 * ph), max(0, (wo - 1) * sw + kw - w - 2 * pw)
    fill = -np.inf if a["pool_type"] == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=fill)
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :ho, :wo]
    if a["pool_type"] == "max":
        v = F32(win.max(axis=(-1, -2))) * (F32(s_in) / F32(s_out))
        return np.clip(round_half_away(v.astype(F32)), -QMAX, QMAX).astype(np.int8)

    def size(n_out: int, k: int, s: int, p: int, n_in: int) -> np.ndarray:
        start = np.arange(n_out) * s - p
        end = np.minimum(start + k, n_in + p)
        if not ceil:
            start, end = np.maximum(start, 0), np.minimum(end, n_in)
        return end - start

    cnt = np.outer(size(ho, kh, sh, ph, h), size(wo, kw, sw, pw, w))
    return _requant((F32(win.sum(axis=(-1, -2))) * F32(s_in)) / F32(cnt), s_out)


def _float_act(n: Node, v: np.ndarray) -> np.ndarray:
    a = n.attrs
    if n.op == "Activation" and a["act_type"] == "relu":
        return np.maximum(v, 0)
    if n.op == "Activation" and a["act_type"] == "sigmoid":  # sigmoid_ref.c: max(x, -30), double exp, to float
        return (1 / (1 + np.exp(-np.maximum(v, F32(-30)).astype(np.float64)))).astype(F32)
    if n.op == "Activation" and a["act_type"] == "tanh":
        return np.tanh(v)
    if n.op == "LeakyReLU":
        return np.where(v > 0, v, v * F32(a["slope"]))
    if n.op == "clip":
        return np.clip(v, a["a_min"], a["a_max"])
    if n.op == "SoftmaxActivation":
        flat = v.reshape(v.shape[0], -1) if a["mode"] == "instance" else v
        e = np.exp(flat - flat.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).reshape(v.shape)
    raise GraphError(f"tengine reference: layer {n.name!r}: no reference for op {n.op}")


class TengineReference:
    """Tengine int8 inference over exported files; ``__call__(x)`` returns the dequantized first output."""

    def __init__(self, symbol_json: str | Path, params: str | Path, scale_table: str | Path,
                 input_shape: tuple[int, ...] = (1, 3, 32, 32)):
        self.graph: Graph = from_files(symbol_json, params, input_shape)
        self.steps = read_scale_table(scale_table)
        g = self.graph
        self.name_of = {t: t for t in g.tensors()}  # IR tensor -> Tengine tensor
        self.fused: dict[str, Node] = {}  # conv name -> fused activation node
        for n in g.nodes:
            prod = g.producer(n.inputs[0]) if n.inputs else None
            relu = n.op == "Activation" and n.attrs["act_type"] == "relu"
            relu6 = n.op == "clip" and (n.attrs["a_min"], n.attrs["a_max"]) == (0.0, 6.0)
            conv = prod is not None and prod.op == "Convolution" and g.n_uses(prod.output) == 1
            if (relu or relu6) and conv:
                self.fused[prod.name] = n
                self.name_of[n.output] = prod.output
        missing = [t for t in dict.fromkeys(self.name_of.values()) if t not in self.steps]
        if missing:
            raise GraphError(f"{scale_table}: no scale for tensors {missing} (Tengine would use 0)")

    def step(self, ir_tensor: str) -> float:
        return self.steps[self.name_of[ir_tensor]]

    def _weights(self, n: Node, s_in: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self.graph.param(n, "weight")
        s_w = weight_steps(w)
        q = weight_codes(w, s_w)
        b = self.graph.param(n, "bias")
        s_b = (s_w * F32(s_in)).astype(F32)
        qb = np.zeros(w.shape[0], np.int64) if b is None else \
            np.where(s_b == 0, 0, round_half_away(b / np.where(s_b == 0, F32(1), s_b))).astype(np.int64)
        return q, s_w, qb

    def _conv_requant(self, n: Node, acc: np.ndarray, s_in: float, s_w: np.ndarray, s_out: float,
                      in_channels: int) -> np.ndarray:
        """int8 codes of a convolution's int32 accumulators ``acc`` (N, C, H, W, bias added), fused activation
        included; the one step a kernel family overrides (``arm64.py``)."""
        if two_step_dequant(conv_kernel(n.attrs, in_channels, acc.shape[1])):  # x86 kernels (spec §5)
            v = (acc.astype(F32) * F32(s_in)) * s_w[None, :, None, None]
        else:  # conv_kernel_ref_int8.c: one precomputed factor
            v = acc.astype(F32) * (F32(s_in) * s_w)[None, :, None, None]
        if n.name in self.fused:
            v = _float_act(self.fused[n.name], v)
        return _requant(v, s_out)

    def run_int8(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """int8 codes of every computed IR tensor (fused activations: on the activation's tensor)."""
        g = self.graph
        vals: dict[str, np.ndarray] = {g.input_name: _requant(np.asarray(x, F32), self.step(g.input_name))}
        for n in g.nodes:
            if n.name in {f.name for f in self.fused.values()}:
                conv = g.producer(n.inputs[0])
                vals[n.output] = vals[conv.output]
                continue
            a = n.attrs
            ins = [vals[t] for t in n.inputs]
            s_ins = [self.step(t) for t in n.inputs]
            s_out = self.step(n.output) if n.name not in self.fused else self.steps[n.output]
            if n.op == "Convolution":
                q, s_w, qb = self._weights(n, s_ins[0])
                acc = _conv_acc(ins[0], q, a) + qb[None, :, None, None]
                out = self._conv_requant(n, acc, s_ins[0], s_w, s_out, ins[0].shape[1])
            elif n.op == "FullyConnected":
                q, s_w, qb = self._weights(n, s_ins[0])
                xin = ins[0].reshape(ins[0].shape[0], -1).astype(np.float64)
                acc = (xin @ q.reshape(q.shape[0], -1).T.astype(np.float64)).astype(np.int64) + qb
                out = np.clip(round_half_away(acc.astype(F32) * (F32(s_ins[0]) * s_w / F32(s_out))),
                              -QMAX, QMAX).astype(np.int8)
            elif n.op == "Pooling":
                out = _pool(ins[0], a, s_ins[0], s_out)
            elif n.op == "elemwise_add":
                out = _requant(sum(q.astype(F32) * F32(s) for q, s in zip(ins, s_ins, strict=True)), s_out)
            elif n.op == "Concat":
                parts = []
                for q, s in zip(ins, s_ins, strict=True):
                    r = round_half_away(q.astype(F32) * (F32(s) / F32(s_out)))  # rescale = s_in / s_out
                    r = np.where(r < -QMAX, QMAX, np.minimum(r, QMAX))  # Tengine's bug: < -127 -> +127
                    parts.append(r.astype(np.int8))
                out = np.concatenate(parts, axis=a["dim"])
            elif n.op in REFERENCE:  # shape_ops.py
                out = REFERENCE[n.op](n, ins, s_ins, s_out)
            elif n.op == "Flatten":
                if s_ins[0] != s_out:
                    raise GraphError(f"tengine reference: Flatten {n.name!r} copies bytes but its input step "
                                     f"{s_ins[0]} != output step {s_out}")
                out = ins[0].reshape(ins[0].shape[0], -1)
            else:
                out = _requant(_float_act(n, ins[0].astype(F32) * F32(s_ins[0])), s_out)
            vals[n.output] = out
        return vals

    def __call__(self, x: np.ndarray, batch_size: int = 100) -> np.ndarray:
        out = self.graph.outputs[0]
        res = [self.run_int8(x[i:i + batch_size])[out] for i in range(0, len(x), batch_size)]
        return np.concatenate(res).astype(F32) * F32(self.step(out))
