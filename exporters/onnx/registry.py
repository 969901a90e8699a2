"""The ONNX lowering registry: IR op -> handler ``(ctx, node)`` that emits the op's ONNX nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployq.exporters.ir.graph import Node

#: ``handler(ctx, node)``; ``ctx`` is the exporter's ``OnnxContext`` (emit, const, act_input, shape, ...).
Handler = Callable[[Any, Node], None]
#: IR op -> lowering function.
HANDLERS: dict[str, Handler] = {}


def handles(*ops: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the lowering of ``ops``."""
    def deco(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
        return fn
    return deco
