"""deployq's graph IR: one intermediate graph between the Gluon front end and every exporter.

A :class:`Graph` holds :class:`Node` objects in topological order. Every node output is a named activation
tensor (a single-output node's tensor has the node's name); weights live in ``Graph.params`` as float32 NumPy
arrays and are referenced from a node by role (``weight``, ``bias``, ``gamma``, ...). Tensors may carry
quantization annotations in ``Graph.quant`` (threshold T in float units; step = T / 127).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployq.errors import InputError

#: MXNet op -> parameter roles in MXNet's input order (after the data input).
PARAM_ROLES: dict[str, tuple[str, ...]] = {
    "Convolution": ("weight", "bias"),
    "FullyConnected": ("weight", "bias"),
    "BatchNorm": ("gamma", "beta", "moving_mean", "moving_var"),
}


class UnsupportedOpError(InputError, ValueError):
    """An MXNet op the IR cannot represent."""


class GraphError(InputError, ValueError):
    """A malformed model file or graph (missing/corrupt params, NaN weights, bad structure)."""


@dataclass
class Node:
    """One operator: ``op`` (MXNet op name), ``name`` (structural name), activation ``inputs``/``outputs``
    (tensor names), typed ``attrs`` and ``params`` (role -> key of ``Graph.params``)."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.outputs[0]


@dataclass
class TensorQuant:
    """Quantization annotation of one tensor: symmetric threshold T (float units), observed ``lo``/``hi`` and
    where it came from (``scale-file``, ``calibration``, ...)."""

    threshold: float
    lo: float
    hi: float
    source: str = ""

    def step(self, qmax: int = 127) -> float:
        """Step convention (Tengine, MXNet): x = q * step, step = threshold / qmax."""
        return self.threshold / qmax


@dataclass
class Graph:
    """A CNN as nodes in topological order over named tensors.

    ``input_name`` is the graph input tensor (``data``), ``outputs`` the graph output tensors, ``aliases``
    maps tensor names removed by passes to the tensor that now carries the same value (BN folded into a conv:
    ``features.1`` -> ``features.0``).
    """

    nodes: list[Node]
    params: dict[str, np.ndarray]
    outputs: list[str]
    input_shape: tuple[int, ...] = (1, 3, 32, 32)
    input_name: str = "data"
    name: str = "model"
    aliases: dict[str, str] = field(default_factory=dict)
    quant: dict[str, TensorQuant] = field(default_factory=dict)
    source: str = ""

    # -- queries -------------------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"{self.name}: no node {name!r}")

    def producer(self, tensor: str) -> Node | None:
        """The node producing ``tensor`` (None for the graph input)."""
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    def n_uses(self, tensor: str) -> int:
        """Consumers of ``tensor`` plus one if it is a graph output."""
        return len(self.consumers(tensor)) + (tensor in self.outputs)

    def tensors(self) -> list[str]:
        """All activation tensors in topological order, the input first."""
        return [self.input_name] + [t for n in self.nodes for t in n.outputs]

    def param(self, node: Node, role: str) -> np.ndarray | None:
        key = node.params.get(role)
        return None if key is None else self.params[key]

    def resolve(self, tensor: str) -> str:
        """Follow ``aliases`` to the tensor that carries ``tensor``'s value in this graph."""
        seen = set()
        while tensor in self.aliases and tensor not in seen:
            seen.add(tensor)
            tensor = self.aliases[tensor]
        return tensor

    def copy(self) -> Graph:
        """A copy whose nodes, attrs and dicts can be changed freely (param arrays are shared, treat as
        read-only: passes replace arrays instead of writing into them)."""
        g = copy.copy(self)
        g.nodes = copy.deepcopy(self.nodes)
        g.params = dict(self.params)
        g.outputs = list(self.outputs)
        g.aliases = dict(self.aliases)
        g.quant = dict(self.quant)
        return g

    # -- edits used by passes ------------------------------------------------------------------------------
    def replace_uses(self, old: str, new: str) -> None:
        """Rewire every consumer (and graph output) of tensor ``old`` to ``new`` and record the alias."""
        for n in self.nodes:
            n.inputs = [new if t == old else t for t in n.inputs]
        self.outputs = [new if t == old else t for t in self.outputs]
        self.aliases[old] = new

    def remove(self, node: Node) -> None:
        self.nodes = [n for n in self.nodes if n is not node]
        used = {k for n in self.nodes for k in n.params.values()}
        for key in node.params.values():
            if key not in used:
                self.params.pop(key, None)

    # -- debugging -----------------------------------------------------------------------------------------
    def dump(self) -> str:
        """Readable text form: one line per node with inputs, outputs, attrs, param shapes and annotations."""
        lines = [f"graph {self.name} input {self.input_name}{list(self.input_shape)} outputs {self.outputs}"]
        for n in self.nodes:
            ps = " ".join(f"{r}={k}{list(self.params[k].shape)}" for r, k in n.params.items())
            attrs = " ".join(f"{k}={v}" for k, v in n.attrs.items())
            q = " ".join(f"{t}:T={self.quant[t].threshold:.6g}" for t in n.outputs if t in self.quant)
            extra = "".join(f"  {s}" for s in (f"[{attrs}]" if attrs else "", ps, q) if s)
            lines.append(f"{n.op:<16} {n.name:<28} {','.join(n.inputs)} -> {','.join(n.outputs)}{extra}")
        return "\n".join(lines)
