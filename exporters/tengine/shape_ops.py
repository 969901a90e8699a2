"""Tengine's int8 arithmetic of the shape and elementwise ops that ``rewrite.py`` writes, for the NumPy reference.

One handler per op, ``(node, input codes, input steps, output step) -> output codes`` (batch first):

* ``Reshape`` (``reshape/reshape_ref.c``): a byte copy, no requantization: the steps must be equal;
* ``UpSampling`` nearest (-> Interp, ``interp/interp_ref.c``, resize_type 1): ``in = out_index / scale``,
  ``round((float)(q * s_in) / s_out)``, clamp +-127;
* ``elemwise_mul`` (-> Eltwise PROD, ``eltwise/eltwise_ref.c``): each input dequantized in float32
  (``q * s``), multiplied in float32, ``round(v / s_out)``, clamp +-127.

The MXNet simulation needs no handler for them: its fake-quantized tensors are ``q * s`` in float32 and the
output's fake quantization is ``round(v / s_out)``, the same float operations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from deployq.exporters.ir.graph import GraphError, Node
from deployq.exporters.tengine.lower import QMAX, round_half_away

F32 = np.float32
Handler = Callable[[Node, list[np.ndarray], list[float], float], np.ndarray]


def requant(v: np.ndarray, s_out: float) -> np.ndarray:
    """``clamp(round(v / s_out), -127, 127)`` in float32, half away from zero."""
    return np.clip(round_half_away(v.astype(F32) / F32(s_out)), -QMAX, QMAX).astype(np.int8)


def reshape(n: Node, ins: list[np.ndarray], s_ins: list[float], s_out: float) -> np.ndarray:
    if s_ins[0] != s_out:
        raise GraphError(f"tengine reference: Reshape {n.name!r} copies bytes but its input step {s_ins[0]} != "
                         f"output step {s_out}")
    shape = n.attrs["shape"]
    if shape[:1] != (0,) or n.attrs["reverse"]:
        raise GraphError(f"tengine reference: Reshape {n.name!r}: only (0, ...) shapes are modelled, not {shape}")
    return ins[0].reshape((ins[0].shape[0], *shape[1:]))


def upsampling(n: Node, ins: list[np.ndarray], s_ins: list[float], s_out: float) -> np.ndarray:
    if n.attrs["sample_type"] != "nearest" or len(ins) != 1:
        raise GraphError(f"tengine reference: UpSampling {n.name!r}: only nearest with one input is modelled")
    k = int(n.attrs["scale"])
    v = ins[0].astype(F32) * F32(s_ins[0])
    return requant(v.repeat(k, axis=2).repeat(k, axis=3), s_out)


def elemwise_mul(n: Node, ins: list[np.ndarray], s_ins: list[float], s_out: float) -> np.ndarray:
    a, b = (q.astype(F32) * F32(s) for q, s in zip(ins, s_ins, strict=True))
    return requant(a * b, s_out)


#: op -> its Tengine int8 handler (``TengineReference.run_int8`` dispatches here)
REFERENCE: dict[str, Handler] = {"Reshape": reshape, "UpSampling": upsampling, "elemwise_mul": elemwise_mul}
