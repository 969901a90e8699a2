"""Two small MXNet custom operators that keep running statistics inside a hybridized graph.

MXNet's own BatchNorm updates its moving statistics only in the backward pass, so deployq tracks ranges with
custom operators that update their auxiliary state in the *training* forward (``is_train``), with NDArray ops
only (no host synchronisation), and pass it through unchanged in inference.

- ``deployq_range``: input ``[batch_lo, batch_hi]``; state ``[lo, hi, initialized, steps]``. Training:
  ``lo <- m*lo + (1-m)*batch_lo`` (``rule="ema"``) or ``lo <- min(lo, batch_lo)`` (``rule="minmax"``); the first
  batch initialises; ``steps += 1``. Output ``[lo, hi, steps_before, is_train]`` where lo/hi are the updated values
  in training, the stored ones in inference, and the batch's own range while never initialised.
- ``deployq_ema``: input ``[values]``; state = one running array (e.g. a BatchNorm's running mean and var
  concatenated is split over two calls). Training: ``state <- m*state + (1-m)*values``; output the new state.
"""

from __future__ import annotations

import mxnet as mx
from mxnet import nd


class _Range(mx.operator.CustomOp):
    def __init__(self, momentum: float, rule: str):
        super().__init__()
        self.m, self.rule = momentum, rule

    def forward(self, is_train, req, in_data, out_data, aux):
        b, st = in_data[0], aux[0]
        init = st[2:3] > 0
        if is_train:
            if self.rule == "ema":
                lo = self.m * st[0:1] + (1 - self.m) * b[0:1]
                hi = self.m * st[1:2] + (1 - self.m) * b[1:2]
            else:
                lo, hi = nd.minimum(st[0:1], b[0:1]), nd.maximum(st[1:2], b[1:2])
            lo, hi = nd.where(init, lo, b[0:1]), nd.where(init, hi, b[1:2])
            steps = st[3:4]
            st[:] = nd.concat(lo, hi, nd.ones_like(lo), steps + 1, dim=0)
            flag = nd.ones_like(lo)
        else:
            lo, hi, steps = nd.where(init, st[0:1], b[0:1]), nd.where(init, st[1:2], b[1:2]), st[3:4]
            flag = nd.zeros_like(lo)
        self.assign(out_data[0], req[0], nd.concat(lo, hi, steps, flag, dim=0))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self.assign(in_grad[0], req[0], nd.zeros_like(in_data[0]))


@mx.operator.register("deployq_range")
class _RangeProp(mx.operator.CustomOpProp):
    def __init__(self, momentum="0.9", rule="ema"):
        super().__init__(need_top_grad=False)
        self.momentum, self.rule = float(momentum), rule

    def list_arguments(self):
        return ["batch_range"]

    def list_outputs(self):
        return ["range"]

    def list_auxiliary_states(self):
        return ["state"]

    def infer_shape(self, in_shape):
        return in_shape, [(4,)], [(4,)]

    def create_operator(self, ctx, shapes, dtypes):
        return _Range(self.momentum, self.rule)


class _Ema(mx.operator.CustomOp):
    def __init__(self, momentum: float):
        super().__init__()
        self.m = momentum

    def forward(self, is_train, req, in_data, out_data, aux):
        st = aux[0]
        if is_train:
            st[:] = self.m * st + (1 - self.m) * in_data[0]
        self.assign(out_data[0], req[0], st)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self.assign(in_grad[0], req[0], nd.zeros_like(in_data[0]))


@mx.operator.register("deployq_ema")
class _EmaProp(mx.operator.CustomOpProp):
    def __init__(self, momentum="0.9"):
        super().__init__(need_top_grad=False)
        self.momentum = float(momentum)

    def list_arguments(self):
        return ["values"]

    def list_outputs(self):
        return ["state_out"]

    def list_auxiliary_states(self):
        return ["state"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], [in_shape[0]]

    def create_operator(self, ctx, shapes, dtypes):
        return _Ema(self.momentum)
