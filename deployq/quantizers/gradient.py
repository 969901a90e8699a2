"""A hand-written backward for a quantizer: :func:`custom_gradient`, an MXNet custom operator, so that it works
in hybridized (symbolic) graphs as in imperative ones (``mx.autograd.Function`` is imperative only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mxnet as mx

Forward = Callable[..., mx.nd.NDArray]
Backward = Callable[..., Sequence[mx.nd.NDArray]]

_FUNCS: dict[str, tuple[Forward, Backward]] = {}
_KEYS: dict[tuple[Forward, Backward], str] = {}
OP_TYPE = "dq_custom_gradient"


def custom_gradient(F, forward: Forward, backward: Backward, *inputs):
    """``forward(*inputs)`` in the forward pass and ``backward(dy, *inputs)`` (one gradient per input) in the
    backward pass. Both receive NDArrays; the output has the shape and dtype of ``inputs[0]``. ``F``: the
    ``hybrid_forward`` namespace (``mx.nd`` or ``mx.sym``)."""
    if not inputs:
        raise ValueError("custom_gradient needs at least one input")
    key = _KEYS.setdefault((forward, backward), str(len(_KEYS)))
    _FUNCS[key] = (forward, backward)
    return F.Custom(*inputs, op_type=OP_TYPE, key=key, num_inputs=str(len(inputs)))


class _CustomGradient(mx.operator.CustomOp):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.forward_fn, self.backward_fn = _FUNCS[key]

    def forward(self, is_train, req, in_data, out_data, aux):
        self.assign(out_data[0], req[0], self.forward_fn(*in_data))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        grads = self.backward_fn(out_grad[0], *in_data)
        if len(grads) != len(in_data):
            raise ValueError(f"custom_gradient: backward returned {len(grads)} gradients for {len(in_data)} inputs")
        for i, g in enumerate(grads):
            self.assign(in_grad[i], req[i], g)


@mx.operator.register(OP_TYPE)
class _CustomGradientProp(mx.operator.CustomOpProp):
    def __init__(self, key: str, num_inputs: str) -> None:
        super().__init__(need_top_grad=True)
        self.key, self.n = key, int(num_inputs)

    def list_arguments(self) -> list[str]:
        return [f"in{i}" for i in range(self.n)]

    def list_outputs(self) -> list[str]:
        return ["output"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def infer_type(self, in_type):
        return in_type, [in_type[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return _CustomGradient(self.key)
