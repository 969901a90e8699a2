"""Custom gradients for quantizers, written with MXNet ``F`` operators so that they hybridize.

``with_gradient(F, value, surrogate)`` is ``value`` in the forward pass and has the gradient of ``surrogate`` in
the backward pass (``surrogate + BlockGrad(value - surrogate)``): any backward that is the gradient of some
differentiable expression (straight-through estimators, PACT's clip gradient, LSQ's scaled step gradient) is one
line. ``mx.autograd.Function`` is not used: it runs imperatively only. An MXNet ``Custom`` operator is not used
either: in hybridized graphs on MXNet 1.9.1 with oneDNN it read its inputs in the wrong memory layout (values of
1e31 where the tensor held values below 2, measured on a Conv2D output).
"""

from __future__ import annotations


def with_gradient(F, value, surrogate):
    """``value`` in the forward, the gradient of ``surrogate`` (same shape) in the backward."""
    return surrogate + F.BlockGrad(value - surrogate)


def straight_through(F, x, value):
    """``value`` in the forward, identity gradient to ``x`` (the straight-through estimator)."""
    return with_gradient(F, value, x)
