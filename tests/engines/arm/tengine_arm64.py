"""A NumPy model of Tengine's aarch64 int8 kernels: deployq's Tengine reference with the convolution
requantized in fixed point as ``conv/cortex-a/conv_kernel_int8_arm.c`` + ``armv8/i8gemm_4x16_a72_int8.S`` do.

Per output channel: ``scale = float32(float32(s_in*s_w[c]) / s_out)``, ``(q, e) = frexp(scale)``,
``M = round(q * 2**31)``; ``y = SQRDMULH(acc + bias, M)`` (``(2*a*M + 2**31) >> 32``), then ``y << e`` for
``e > 0`` or a rounding right shift ``(y + 2**(n-1)) >> n`` by ``n = -e``; clamp to ``[-127, 127]``, or for a
fused ReLU ``[0, 127]``, ReLU6 ``[0, min(127, round(6/s_out))]``. Every other op (pooling, eltwise, FC: the aarch64
int8 FC kernel is disabled in ``fc_hcl_arm.c``) runs Tengine's C code, as in the x86 model.
"""

from __future__ import annotations

import numpy as np
from deployq.exporters.tengine import reference as ref

F32 = np.float32


def sqrdmulh(a: np.ndarray, m: int) -> np.ndarray:
    """AArch64 SQRDMULH of int32 lanes by the int32 ``m``: saturating rounding doubling high half."""
    return np.clip((2 * a.astype(np.int64) * np.int64(m) + (1 << 31)) >> 32, -(2 ** 31), 2 ** 31 - 1)


def fixed_point_requant(acc: np.ndarray, s_in: float, s_w: np.ndarray, s_out: float, lo: int, hi: int
                        ) -> np.ndarray:
    """int8 codes of int32 accumulators ``acc`` (N, C, ...) with bias, requantized per channel in fixed point."""
    out = np.empty(acc.shape, np.int64)
    for c in range(acc.shape[1]):
        q, e = np.frexp(np.float64(F32(F32(s_in) * F32(s_w[c])) / F32(s_out)))
        m = int(round(float(q) * 2 ** 31))
        if m == 2 ** 31:
            m, e = m // 2, e + 1
        y = sqrdmulh(acc[:, c], m)
        y = y << e if e > 0 else (y + (1 << (-e - 1))) >> -e if e < 0 else y
        out[:, c] = np.clip(y, lo, hi)
    return out.astype(np.int8)


class Arm64TengineReference(ref.TengineReference):
    """:class:`~deployq.exporters.tengine.reference.TengineReference` with aarch64 convolution requantization
    (the other ops follow the parent's model)."""

    def run_int8(self, x: np.ndarray) -> dict[str, np.ndarray]:
        g = self.graph
        fused_acts = {f.name for f in self.fused.values()}
        vals: dict[str, np.ndarray] = {g.input_name: ref._requant(np.asarray(x, F32), self.step(g.input_name))}
        for n in g.nodes:
            if n.name in fused_acts:
                vals[n.output] = vals[g.producer(n.inputs[0]).output]
                continue
            s_ins = [self.step(t) for t in n.inputs]
            s_out = self.step(n.output) if n.name not in self.fused else self.steps[n.output]
            if n.op == "Convolution":
                q, s_w, qb = self._weights(n, s_ins[0])
                acc = ref._conv_acc(vals[n.inputs[0]], q, n.attrs) + qb[None, :, None, None]
                lo, hi = -127, 127
                act = self.fused.get(n.name)
                if act is not None:
                    lo = 0
                    if act.op == "clip":
                        hi = min(127, int(np.floor(6.0 / s_out + 0.5)))
                vals[n.output] = fixed_point_requant(acc, s_ins[0], s_w, s_out, lo, hi)
            elif n.op == "FullyConnected":
                q, s_w, qb = self._weights(n, s_ins[0])
                xin = vals[n.inputs[0]].reshape(len(x), -1).astype(np.float64)
                acc = (xin @ q.reshape(q.shape[0], -1).T.astype(np.float64)).astype(np.int64) + qb
                v = acc.astype(F32) * (F32(s_ins[0]) * s_w / F32(s_out))
                vals[n.output] = np.clip(ref.round_half_away(v), -ref.QMAX, ref.QMAX).astype(np.int8)
            elif n.op == "Pooling":
                vals[n.output] = ref._pool(vals[n.inputs[0]], n.attrs, s_ins[0], s_out)
            elif n.op == "elemwise_add":
                vals[n.output] = ref._requant(sum(vals[t].astype(F32) * F32(s)
                                                  for t, s in zip(n.inputs, s_ins, strict=True)), s_out)
            elif n.op == "Flatten":
                vals[n.output] = vals[n.inputs[0]].reshape(len(x), -1)
            elif n.op == "Concat":
                raise ref.GraphError(f"arm64 Tengine model: Concat {n.name!r} not modelled yet")
            else:  # activations: float op between dequantize and requantize (raises for unknown ops)
                vals[n.output] = ref._requant(ref._float_act(n, vals[n.inputs[0]].astype(F32) * F32(s_ins[0])),
                                              s_out)
        return vals
