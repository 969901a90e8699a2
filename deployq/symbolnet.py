"""Any MXNet symbol as a Gluon HybridBlock that deployq can quantize, train and save.

``gluon.SymbolBlock`` runs a json/params export but has no child blocks, so there is nothing for
``deployq.quantize`` to swap. :class:`SymbolNet` rebuilds the graph instead: every 2-D ``Convolution``,
``FullyConnected``, ``BatchNorm`` and ``Activation`` node becomes an ``nn.Conv2D`` / ``nn.Dense`` /
``nn.BatchNorm`` / ``nn.Activation`` child named after the node (so layer names, scale files and error messages
use the export's node names, as the json/params route does), every other node runs as the MXNet operator it
names. The same symbol JSON rebuilds the same block tree, which is how a saved quantized net of any
architecture reloads (``deployq.save`` stores the JSON).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from .errors import InputError, short_message

#: ops that become child blocks (the rest run as MXNet operators)
LAYER_OPS = ("Convolution", "FullyConnected", "BatchNorm", "Activation")


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text.replace("True", "1").replace("False", "0")
                                .replace("true", "1").replace("false", "0"))
    except (ValueError, SyntaxError):
        return text


def _pair(v: Any, n: int = 2) -> tuple[int, ...]:
    v = _value(v) if isinstance(v, str) else v
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _key(name: str, taken: set[str]) -> str:
    base = name.replace(".", "_") or "node"
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _op_function(F: Any, op: str) -> Any:
    """The MXNet operator function named ``op`` in the ``F`` namespace (``mx.nd`` or ``mx.sym``)."""
    for ns, name in ((F, op), (F._internal, op), (getattr(F, "contrib", None), op.removeprefix("_contrib_")),
                     (F._internal, "_" + op)):
        fn = getattr(ns, name, None) if ns is not None else None
        if callable(fn):
            return fn
    return None


class SymbolNet(gluon.HybridBlock):
    """A HybridBlock that runs an MXNet symbol graph, with one Gluon layer block per Conv/Dense/BN/Activation.

    Build it with :meth:`from_files` (json + params) or :meth:`from_json` (structure only; load weights after).
    ``symbol_json`` keeps the source JSON text (``deployq.save`` stores it)."""

    def __init__(self, symbol_json: str, input_shape: tuple[int, ...], source: str = "symbol",
                 all_outputs: bool = False) -> None:
        super().__init__(prefix="", params=None)
        self.symbol_json = symbol_json
        self.input_shape = tuple(int(v) for v in input_shape)
        self.source = source
        try:
            js = json.loads(symbol_json)
            self._nodes: list[dict[str, Any]] = js["nodes"]
            self._heads: list[list[int]] = js["heads"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{source}: not an MXNet symbol JSON ({e})",
                             fix="pass the -symbol.json written by HybridBlock.export") from None
        self._check_links()
        if len(self._heads) > 1 and not all_outputs:  # a training-time auxiliary head (nasnet, inception)
            self._heads = self._heads[:1]
        self._live = self._reachable()
        try:
            sym = mx.sym.load_json(symbol_json)
            arg_shapes, _, aux_shapes = sym.infer_shape(data=self.input_shape)
        except mx.base.MXNetError as e:
            raise InputError(f"{source}: its graph does not take input shape {self.input_shape}: "
                             f"{short_message(e)}",
                             fix="pass --input-shape N,C,H,W the model was built for") from None
        if arg_shapes is None:
            raise InputError(f"{source}: cannot infer shapes from input 'data' {self.input_shape}")
        self.shapes = dict(zip(sym.list_arguments(), arg_shapes, strict=True))
        self.shapes.update(zip(sym.list_auxiliary_states(), aux_shapes, strict=True))
        self._layer_of: dict[int, str] = {}   # node index -> child key
        self._param_of: dict[int, str] = {}   # null node index -> own parameter key (params of plain ops)
        self.param_sources: dict[str, str] = {}  # structural param name -> name in the json/params export
        taken: set[str] = set()
        consumed: set[int] = set()
        for i, n in enumerate(self._nodes):
            if i not in self._live:
                continue
            blk = self._layer_block(n, _key(n["name"], set(taken)))
            if blk is None:
                continue
            key = _key(n["name"], taken)
            self.register_child(blk, key)
            self._layer_of[i] = key
            for role, (src, _, *_) in zip(self._roles(n), n["inputs"][1:], strict=False):
                consumed.add(src)
                self.param_sources[f"{key}.{role}"] = self._nodes[src]["name"]
        #: node index -> a unique op name (exports with duplicated node names, e.g. xception, dla34)
        self._op_name: dict[int, str] = {i: _key(n["name"], taken) for i, n in enumerate(self._nodes)
                                         if n["op"] != "null" and i not in self._layer_of and i in self._live}
        for i, n in enumerate(self._nodes):
            if (n["op"] == "null" and n["name"] != "data" and i not in consumed and i in self._live
                    and n["name"] in self.shapes and not n["name"].endswith("label")):
                pkey = _key(n["name"], taken)
                self._param_of[i] = pkey
                p = self.params.get(pkey, shape=self.shapes[n["name"]], allow_deferred_init=True)
                self._reg_params[pkey] = p
                self.param_sources[pkey] = n["name"]

    # ------------------------------------------------------------------ building

    def _reachable(self) -> set[int]:
        """Indices of the nodes the kept heads depend on."""
        live, todo = set(), [h[0] for h in self._heads]
        while todo:
            i = todo.pop()
            if i not in live:
                live.add(i)
                todo.extend(src for src, *_ in self._nodes[i]["inputs"])
        return live

    def _check_links(self) -> None:
        n = len(self._nodes)
        for i, node in enumerate(self._nodes):
            for inp in node.get("inputs", []):
                if not (isinstance(inp, list) and inp and isinstance(inp[0], int) and 0 <= inp[0] < i):
                    raise InputError(f"{self.source}: node {node.get('name')!r} reads input {inp!r}, which is not "
                                     f"an earlier node (the graph has {n} nodes)")
        for h in self._heads:
            if not 0 <= h[0] < n:
                raise InputError(f"{self.source}: output {h!r} names no node")
        if not any(x["op"] == "null" and x["name"] == "data" for x in self._nodes):
            raise InputError(f"{self.source}: no graph input named 'data'",
                             fix="export the net with its input called 'data' (HybridBlock.export does)")

    @staticmethod
    def _attrs(n: dict[str, Any]) -> dict[str, str]:
        return {k: v for k, v in (n.get("attrs") or n.get("attr") or {}).items() if not k.startswith("__")}

    @staticmethod
    def _roles(n: dict[str, Any]) -> tuple[str, ...]:
        return {"Convolution": ("weight", "bias"), "FullyConnected": ("weight", "bias"),
                "BatchNorm": ("gamma", "beta", "running_mean", "running_var")}.get(n["op"], ())

    def _layer_block(self, n: dict[str, Any], key: str) -> gluon.HybridBlock | None:
        """The Gluon layer that runs node ``n`` as child ``key`` (its unique name), or None (run as the op)."""
        op, a = n["op"], self._attrs(n)
        if op not in LAYER_OPS:
            return None
        if op == "Convolution":
            kernel = _pair(a.get("kernel", "(1, 1)"))
            if len(kernel) != 2 or a.get("layout", "NCHW") != "NCHW":
                return None  # 1-D/3-D or NHWC convolutions run as the operator (not quantized)
            w = self.shapes[self._nodes[n["inputs"][1][0]]["name"]]
            groups = int(a.get("num_group", 1))
            return nn.Conv2D(int(a["num_filter"]), kernel, strides=_pair(a.get("stride", 1)),
                             padding=_pair(a.get("pad", 0)), dilation=_pair(a.get("dilate", 1)), groups=groups,
                             use_bias=not _value(a.get("no_bias", "False")), in_channels=int(w[1]) * groups,
                             prefix=f"{key}_")
        if op == "FullyConnected":
            w = self.shapes[self._nodes[n["inputs"][1][0]]["name"]]
            return nn.Dense(int(a["num_hidden"]), use_bias=not _value(a.get("no_bias", "False")),
                            flatten=bool(_value(a.get("flatten", "True"))), in_units=int(w[1]), prefix=f"{key}_")
        if op == "BatchNorm":
            if int(a.get("axis", 1)) != 1 or _value(a.get("output_mean_var", "False")):
                return None
            g = self.shapes[self._nodes[n["inputs"][1][0]]["name"]]
            return nn.BatchNorm(axis=1, momentum=float(a.get("momentum", 0.9)), epsilon=float(a.get("eps", 1e-3)),
                                scale=not _value(a.get("fix_gamma", "True")),
                                use_global_stats=bool(_value(a.get("use_global_stats", "False"))),
                                in_channels=int(g[0]), prefix=f"{key}_")
        return nn.Activation(a.get("act_type", "relu"), prefix=f"{key}_")

    @classmethod
    def from_json(cls, text: str, input_shape: tuple[int, ...], source: str = "symbol") -> SymbolNet:
        return cls(text, input_shape, source)

    @classmethod
    def from_files(cls, symbol: str | Path, params: str | Path | None, input_shape: tuple[int, ...],
                   ctx: mx.Context | None = None) -> SymbolNet:
        """The net of an MXNet export (``-symbol.json`` + ``-0000.params``), weights loaded and checked."""
        try:
            text = Path(symbol).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{symbol}: cannot read the symbol JSON ({getattr(e, 'strerror', None) or e})") from None
        net = cls(text, input_shape, str(symbol))
        if params is not None:
            net.load_export_params(params, ctx)
        return net

    def load_export_params(self, params: str | Path, ctx: mx.Context | None = None) -> None:
        """Set the weights from an MXNet ``.params`` export (``arg:``/``aux:`` keys or plain names)."""
        from .exporters.ir.frontend import load_params

        try:
            arrays = load_params(params)
        except Exception as e:  # noqa: BLE001 (MXNet raises its own error types for a bad file)
            raise InputError(f"{params}: not an MXNet .params file ({short_message(e)[:200]})") from None
        ctx = ctx or mx.cpu()
        by_struct = self._collect_params_with_prefix()
        missing = [src for key, src in self.param_sources.items() if src not in arrays and not key.endswith(".gamma")]
        if missing:
            raise InputError(f"{params}: missing parameter {missing[0]!r} used by {self.source}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                             fix="pass the .params file exported with this symbol JSON")
        for key, src in self.param_sources.items():
            p = by_struct.get(key)
            if p is None:
                continue
            arr = arrays.get(src)
            if arr is None:  # e.g. gamma of a fix_gamma BatchNorm: MXNet treats it as ones
                arr = np.ones(p.shape, np.float32)
            if p.shape and tuple(arr.shape) != tuple(p.shape):
                raise InputError(f"{params}: parameter {src!r} has shape {tuple(arr.shape)}, "
                                 f"{self.source} needs {tuple(p.shape)} at input {self.input_shape}")
            if not np.all(np.isfinite(arr)):
                raise InputError(f"{params}: parameter {src!r} holds NaN/Inf values")
            if p._data is None:
                p.initialize(ctx=ctx)
            p.set_data(mx.nd.array(arr, ctx=ctx, dtype=p.dtype))

    # ------------------------------------------------------------------ running

    def hybrid_forward(self, F: Any, x: Any, **params: Any) -> Any:
        values: dict[tuple[int, int], Any] = {}
        for i, n in enumerate(self._nodes):
            if i not in self._live:
                continue
            if n["op"] == "null":
                if n["name"] == "data":
                    values[(i, 0)] = x
                elif i in self._param_of:
                    values[(i, 0)] = params[self._param_of[i]]
                continue
            if i in self._layer_of:
                out = self._children[self._layer_of[i]](values[tuple(n["inputs"][0][:2])])
                values[(i, 0)] = out
                continue
            args = [values[(s, k)] for s, k, *_ in n["inputs"] if (s, k) in values]
            if n["op"] == "SoftmaxOutput":  # a training head: at inference, softmax over the data input
                values[(i, 0)] = F.softmax(args[0], axis=-1, name=self._op_name[i])
                continue
            fn = _op_function(F, n["op"])
            if fn is None:
                raise InputError(f"{self.source}: node {n['name']!r}: op {n['op']} is not an MXNet {mx.__version__} "
                                 "operator")
            try:
                out = fn(*args, **self._attrs(n), name=self._op_name[i])
            except mx.base.MXNetError as e:
                raise InputError(f"{self.source}: node {n['name']!r}: op {n['op']} does not run with its attributes "
                                 f"({short_message(e)[:160]})") from None
            if isinstance(out, (list, tuple)) or (F is mx.sym and len(out.list_outputs()) > 1):
                for k in range(len(out)):
                    values[(i, k)] = out[k]
            else:
                values[(i, 0)] = out
        outs = [values[(h[0], h[1])] for h in self._heads]
        return outs[0] if len(outs) == 1 else outs
