"""Front ends: a hybridizable Gluon net or an MXNet json/params pair -> an IR ``Graph``."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import mxnet as mx
import numpy as np
from deployq.exporters.ir.graph import PARAM_ROLES, Graph, GraphError, Node
from deployq.exporters.ir.ops import OP_ALIASES, OP_FORM_ACTIVATIONS, SUPPORTED_OPS, parse_attrs, unsupported_op
from mxnet import gluon

from deployq.checks import check_graph_batchnorm
from deployq.errors import short_message
from deployq.naming import node_path, prefix_map

NUMPY_MODE_MAGIC = 0xF993FACA
_DROPPED_INPUT_WORDS = ("label",)


def _float_mode(net: gluon.Block) -> contextlib.AbstractContextManager:
    """``deployq.float_mode(net)`` for a deployq-quantized net, else (or before that API lands) a no-op."""
    try:
        from deployq import float_mode, quant_layers  # type: ignore[attr-defined]
    except ImportError:
        return contextlib.nullcontext()
    try:
        quantized = bool(quant_layers(net))
    except Exception:  # noqa: BLE001 - a plain net the quantizer does not know
        quantized = False
    return float_mode(net) if quantized else contextlib.nullcontext()


def from_gluon(net: gluon.HybridBlock, input_shape: tuple[int, ...] = (1, 3, 32, 32),
               name: str = "model", all_outputs: bool = False) -> Graph:
    """Trace ``net`` symbolically and name nodes and params by structural path (``features.0``).

    A deployq-quantized net is traced inside ``deployq.float_mode`` (its fp32 graph, no fake quantization).
    """
    if not isinstance(net, gluon.HybridBlock):
        raise GraphError(f"{type(net).__name__}: not a gluon.HybridBlock; only hybridizable nets can be traced")
    with _float_mode(net):
        net(mx.nd.zeros(input_shape))  # finish deferred initialisation
        try:
            out = net(mx.sym.var("data"))
        except (mx.base.MXNetError, TypeError, AttributeError) as e:
            raise GraphError(f"Gluon net {type(net).__name__}: symbolic tracing failed (a child that is not "
                             f"hybridizable?): {e}") from None
    if isinstance(out, list | tuple):
        out = mx.sym.Group(list(out))
    prefixes = prefix_map(net)
    used = set(out.list_arguments()) | set(out.list_auxiliary_states())
    params = {p.name: p.data(mx.cpu()).asnumpy() for p in net.collect_params().values() if p.name in used}
    return _from_json(out.tojson(), params, input_shape, name=name, source=f"Gluon net {type(net).__name__}",
                      rename=lambda s: node_path(s, prefixes), all_outputs=all_outputs)


def from_files(symbol_json: str | Path, params: str | Path, input_shape: tuple[int, ...] = (1, 3, 32, 32),
               name: str | None = None, all_outputs: bool = False) -> Graph:
    """Read ``x-symbol.json`` and ``x-0000.params`` (legacy MXNet format; ``arg:``/``aux:`` are stripped)."""
    symbol_json, params = Path(symbol_json), Path(params)
    try:
        text = symbol_json.read_text()
        json.loads(text)
    except (OSError, ValueError) as e:
        raise GraphError(f"{symbol_json}: cannot read the MXNet symbol JSON: {e}") from None
    arrays = load_params(params)
    if name is None:
        name = symbol_json.name.removesuffix(".json").removesuffix("-symbol")
    return _from_json(text, arrays, input_shape, name=name, source=str(symbol_json), params_file=str(params),
                      all_outputs=all_outputs)


def load_params(path: str | Path) -> dict[str, np.ndarray]:
    """``mx.nd.load`` with clear errors for missing, truncated/corrupt and numpy-mode (V3) files."""
    path = Path(path)
    try:
        head = path.read_bytes()[:32]
    except OSError as e:
        raise GraphError(f"{path}: cannot read the params file: {e}") from None
    if len(head) >= 28 and struct.unpack("<I", head[24:28])[0] == NUMPY_MODE_MAGIC:
        raise GraphError(f"{path}: numpy-mode params (array magic 0xF993FACA, written under npx.set_np()); "
                         "MXNet's legacy loader and Tengine's converter cannot read it. Re-export without "
                         "npx.set_np() (legacy mode) or save with mx.nd.save.")
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as e:
        msg = short_message(e) if str(e).strip() else type(e).__name__
        raise GraphError(f"{path}: corrupt or truncated MXNet params file ({msg})") from None
    if not isinstance(loaded, dict):
        raise GraphError(f"{path}: params file holds an unnamed list of arrays; "
                         "expected named arg:/aux: arrays")
    return {k.split(":", 1)[1] if ":" in k else k: v.asnumpy() for k, v in loaded.items()}


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def keep_outputs(g: Graph, outputs: list[str]) -> Graph:
    """``g`` with only ``outputs`` (an auxiliary training head dropped) and the nodes they depend on."""
    need, keep = set(outputs), []
    for n in reversed(g.nodes):
        if any(t in need for t in n.outputs):
            keep.append(n)
            need.update(n.inputs)
    used = {k for n in keep for k in n.params.values()}
    return Graph(keep[::-1], {k: v for k, v in g.params.items() if k in used}, list(outputs), g.input_shape,
                 g.input_name, g.name, source=g.source)


def _from_json(text: str, params: dict[str, np.ndarray], input_shape: tuple[int, ...], name: str, source: str,
               rename: Callable[[str], str] = lambda s: s, params_file: str | None = None,
               all_outputs: bool = False) -> Graph:
    """The IR of a symbol JSON. Only the first output is kept (calibration, simulation and the engines
    run the primary head; a second head is a training-time auxiliary classifier) unless ``all_outputs``."""
    where_params = params_file or source
    js = json.loads(text)
    try:
        jnodes, heads = js["nodes"], js["heads"]
    except KeyError as e:
        raise GraphError(f"{source}: not an MXNet symbol JSON (no {e.args[0]!r})") from None
    null_ids = {i for i, n in enumerate(jnodes) if n["op"] == "null"}
    taken: set[str] = {"data"}
    tensor_of: dict[tuple[int, int], str] = {}
    param_key: dict[int, str] = {}
    data_ids = [i for i in null_ids if jnodes[i]["name"] == "data"]
    if not data_ids:
        raise GraphError(f"{source}: no graph input named 'data'")
    tensor_of[(data_ids[0], 0)] = "data"
    for i in sorted(null_ids - set(data_ids)):
        nm = jnodes[i]["name"]
        if any(w in nm for w in _DROPPED_INPUT_WORDS):
            continue
        if nm not in params:
            raise GraphError(f"{where_params}: missing param {nm!r} (used by {source})")
        param_key[i] = _unique(rename(nm), taken)
    out_params: dict[str, np.ndarray] = {}
    for i, key in param_key.items():
        arr = params[jnodes[i]["name"]]
        if not np.all(np.isfinite(arr)):
            raise GraphError(f"{where_params}: param {jnodes[i]['name']!r} holds NaN/Inf values")
        out_params[key] = np.ascontiguousarray(arr, dtype=np.float32)

    nodes: list[Node] = []
    for i, jn in enumerate(jnodes):
        if i in null_ids:
            continue
        op = OP_ALIASES.get(jn["op"], jn["op"])
        nname = _unique(rename(jn["name"]), taken)
        where = f"{source}: node {jn['name']!r}" + (f" ({nname})" if nname != jn["name"] else "")
        if op not in SUPPORTED_OPS:
            raise unsupported_op(where, jn["op"])
        raw = jn.get("attrs", jn.get("attr", {})) or {}
        if jn["op"] in OP_FORM_ACTIVATIONS:  # F.relu(x) / F.sigmoid(x): Activation with that act_type
            raw = {"act_type": jn["op"]}
        attrs = parse_attrs(op, raw, where)
        inputs, pkeys = [], {}
        roles = iter(PARAM_ROLES.get(op, ()))
        for src, idx, *_ in jn["inputs"]:
            if not isinstance(src, int) or not 0 <= src < i:
                raise GraphError(f"{where}: input {src!r} is not an earlier node (the JSON has {len(jnodes)} nodes)")
            if src in param_key:
                pkeys[next(roles, f"param{len(pkeys)}")] = param_key[src]
            elif (src, idx) in tensor_of:
                inputs.append(tensor_of[(src, idx)])
            elif src in null_ids:
                continue  # a dropped label input
            else:
                raise GraphError(f"{where}: op {op} reads output {idx} of node {jnodes[src]['name']!r}, "
                                 "which the IR does not represent (only first outputs are supported)")
        tensor_of[(i, 0)] = nname
        nodes.append(Node(op, nname, inputs, [nname], attrs, pkeys))
    if any((h[0], h[1]) not in tensor_of for h in heads):
        raise GraphError(f"{source}: 'heads' {heads} name a node output the graph does not have")
    outputs = [tensor_of[(h[0], h[1])] for h in heads]
    g = Graph(nodes, out_params, outputs, tuple(input_shape), "data", name, source=source)
    if len(outputs) > 1 and not all_outputs:
        g = keep_outputs(g, outputs[:1])
    _check_shapes(g)
    check_graph_batchnorm(g, where_params)  # a negative / non-finite moving_var: refused
    return g


def _check_shapes(g: Graph) -> None:
    """Catch params whose shapes do not fit the graph (a params file of another model) early."""
    from deployq.exporters.ir.mxnet_lower import to_symbol

    sym, _, _ = to_symbol(g)
    try:
        arg_shapes, _, aux_shapes = sym.infer_shape(data=g.input_shape)
    except mx.base.MXNetError as e:
        raise GraphError(f"{g.source}: shapes do not fit input {g.input_shape}: "
                         f"{short_message(e)}") from None
    shapes = dict(zip(sym.list_arguments(), arg_shapes, strict=True))
    shapes.update(zip(sym.list_auxiliary_states(), aux_shapes, strict=True))
    for key, arr in g.params.items():
        if key in shapes and tuple(shapes[key]) != arr.shape:
            raise GraphError(f"{g.source}: param {key!r} has shape {arr.shape}, "
                             f"the graph needs {shapes[key]}")
