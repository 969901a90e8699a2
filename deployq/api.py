"""deployq's Python API: quantize a Gluon net, describe it, switch it to fp32, save/load it, train it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn

from .blocks import (
    QUANT_TYPES,
    BypassActivation,
    BypassBatchNorm,
    OutputQuantizer,
    _Bypass,
    can_quantize_output,
    is_output_quantizer,
    is_quant_block,
    with_output_quantizer,
)
from .config import LayerConfig, resolve
from .errors import short_message
from .naming import block_paths, node_path, prefix_map, structure_fingerprint
from .profiles import Profile, TensorGrid, load_profile
from .quantizers import get_quantizer


def _float_type(b: gluon.Block) -> type | None:
    return next((t for t in QUANT_TYPES if type(b) is t), None)


def _parent_of(paths: dict[str, gluon.Block], path: str) -> tuple[gluon.Block, str]:
    parent, _, key = path.rpartition(".")
    return paths[parent], key


def _replace_child(parent: gluon.Block, key: str, new: gluon.Block) -> None:
    old = parent._children[key]
    parent._children[key] = new
    for attr, val in list(parent.__dict__.items()):
        if val is old:
            object.__setattr__(parent, attr, new)


def trace_symbol(net: gluon.HybridBlock) -> mx.sym.Symbol:
    """The net's symbol on input ``data`` (the net must be a HybridBlock)."""
    if not isinstance(net, gluon.HybridBlock):
        raise TypeError(f"deployq needs a HybridBlock (got {type(net).__name__}); it reads the graph by tracing")
    out = net(mx.sym.var("data"))
    return out[0] if isinstance(out, (list, tuple)) else out


def _graph(net: gluon.HybridBlock) -> tuple[list[dict[str, Any]], set[int], dict[int, list[int]]]:
    """The traced graph's nodes, the indices of its outputs and, per node index, the nodes reading it."""
    graph = json.loads(trace_symbol(net).tojson())
    nodes, heads = graph["nodes"], {h[0] for h in graph["heads"]}
    consumers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for src, *_ in n["inputs"]:
            consumers.setdefault(src, []).append(i)
    return nodes, heads, consumers


def conv_bn_pairs(net: gluon.HybridBlock) -> dict[str, str]:
    """Conv2D path -> BatchNorm path for every convolution whose only consumer is a BatchNorm (by topology)."""
    nodes, _, consumers = _graph(net)
    pm = prefix_map(net)
    by_prefix = {p: path for p, path in pm.items()}
    pairs = {}
    for i, n in enumerate(nodes):
        if n["op"] != "Convolution" or len(consumers.get(i, [])) != 1:
            continue
        bn = nodes[consumers[i][0]]
        if bn["op"] != "BatchNorm" or bn["inputs"][0][0] != i:
            continue
        conv_path = by_prefix.get(n["name"][: -len("fwd")]) if n["name"].endswith("fwd") else None
        bn_path = by_prefix.get(bn["name"][: -len("fwd")]) if bn["name"].endswith("fwd") else None
        if conv_path is not None and bn_path is not None:
            pairs[conv_path] = bn_path
    return pairs


def output_points(net: gluon.HybridBlock, folded: dict[str, str]) -> dict[str, bool]:
    """The layers that get an output quantization point under ``quantize_outputs: non_layer_consumers``, by
    topology: layer path -> whether the point lies after the ReLU that follows the layer.

    A layer's output tensor is its Conv2D/Dense output (after its own activation), followed through the
    BatchNorm folded into it (``folded``: conv path -> BatchNorm path) and through a ReLU that only it feeds
    (so that ``Conv -> ReLU -> Q`` is what an engine fuses). A layer qualifies when that tensor has a consumer
    other than a Conv2D/Dense layer (Add, pooling, concat, ...); the graph output does not count. A layer
    followed by a BatchNorm that is not folded gets none (the point would lie between the two)."""
    nodes, heads, consumers = _graph(net)
    pm, paths = prefix_map(net), block_paths(net)

    def layer_of(n: dict[str, Any]) -> str | None:
        if n["op"] not in ("Convolution", "FullyConnected") or not n["name"].endswith("fwd"):
            return None
        path = pm.get(n["name"][: -len("fwd")])
        return path if path and _float_type(paths[path]) is not None else None

    def sole(i: int, op: str) -> int | None:
        cs = consumers.get(i, [])
        return cs[0] if len(cs) == 1 and i not in heads and nodes[cs[0]]["op"] == op else None

    out: dict[str, bool] = {}
    for i, n in enumerate(nodes):
        path = layer_of(n)
        if path is None:
            continue
        t, relu = i, False
        if getattr(paths[path], "act", None) is not None:
            t = sole(t, "Activation")  # the layer's own activation ends the layer
            if t is None:
                continue
        else:
            bn = sole(t, "BatchNorm")
            if bn is not None:
                if path not in folded:
                    continue
                t = bn
            act = sole(t, "Activation")
            if act is not None and nodes[act].get("attrs", {}).get("act_type") == "relu":
                t, relu = act, True
        if any(layer_of(nodes[c]) is None for c in consumers.get(t, [])):
            out[path] = relu
    return out


def input_relus(net: gluon.HybridBlock, cfgs: dict[str, LayerConfig]) -> dict[str, list[str]]:
    """ReLU block path -> the quantized layers that read it, for every ``nn.Activation('relu')`` block whose
    output only quantized Conv2D/Dense layers read (as their data input; not a graph output), by topology. Those
    layers apply the ReLU in their input quantizer and the block is bypassed while the net is quantized."""
    nodes, heads, consumers = _graph(net)
    pm, paths = prefix_map(net), block_paths(net)

    def path_of(n: dict[str, Any]) -> str | None:
        return pm.get(n["name"][: -len("fwd")]) if n["name"].endswith("fwd") else None

    out: dict[str, list[str]] = {}
    for i, n in enumerate(nodes):
        if n["op"] != "Activation" or i in heads or not consumers.get(i):
            continue
        act = path_of(n)
        blk = paths.get(act) if act else None
        if type(blk) is not nn.Activation or blk._act_type != "relu":
            continue
        readers = []
        for c in consumers[i]:
            cn = nodes[c]
            layer = path_of(cn) if cn["op"] in ("Convolution", "FullyConnected") else None
            cfg = cfgs.get(layer) if layer else None
            if cfg is None or not cfg.quantized or [src for src, *_ in cn["inputs"]].count(i) != 1 \
                    or cn["inputs"][0][0] != i:
                break
            readers.append(layer)
        else:
            out[act] = sorted(set(readers))
    return out


_ADD_OPS = ("elemwise_add", "broadcast_add", "_Plus", "_plus")


def block_output_points(net: gluon.HybridBlock) -> dict[str, str]:
    """The blocks whose output gets a quantization point under ``quantize_outputs: non_layer_consumers``:
    block path -> symbol node name of that output. A block qualifies when its output is an elementwise Add
    (through a ReLU only it feeds), typically a residual block's ``relu(body(x) + shortcut)``, read by
    something other than a Conv2D/Dense layer (the next block's shortcut Add, pooling; not the graph output),
    and when :func:`deployq.blocks.can_quantize_output` applies to it; of the blocks ending in one tensor, the
    innermost. Quantizing that tensor once lets an engine run those Adds on integers (QLinearAdd), as it runs
    the layers whose outputs feed them (see :func:`output_points`)."""
    paths = block_paths(net)
    seen: dict[str, Any] = {}

    def record(path: str):
        def hook(_blk, _inputs, output):
            seen[path] = output
        return hook

    handles = [b.register_forward_hook(record(p)) for p, b in paths.items() if p and can_quantize_output(b)]
    try:
        graph = json.loads(trace_symbol(net).tojson())
    finally:
        for h in handles:
            h.detach()
    nodes, heads = graph["nodes"], {h[0] for h in graph["heads"]}
    index = {n["name"]: i for i, n in enumerate(nodes)}
    consumers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for src, *_ in n["inputs"]:
            consumers.setdefault(src, []).append(i)
    pm = prefix_map(net)

    def is_layer(n: dict[str, Any]) -> bool:
        if n["op"] not in ("Convolution", "FullyConnected") or not n["name"].endswith("fwd"):
            return False
        path = pm.get(n["name"][: -len("fwd")])
        return bool(path) and _float_type(paths[path]) is not None

    best: dict[int, str] = {}
    for path, out in seen.items():
        if not isinstance(out, mx.sym.Symbol) or len(out.list_outputs()) != 1 or out.name not in index:
            continue
        i = index[out.name]
        j = i
        if nodes[i]["op"] == "Activation" and nodes[i].get("attrs", {}).get("act_type") == "relu":
            j = nodes[i]["inputs"][0][0]
            if consumers.get(j) != [i] or j in heads:
                continue
        if nodes[j]["op"] not in _ADD_OPS:
            continue
        if not any(not is_layer(nodes[c]) for c in consumers.get(i, [])):
            continue
        if i not in best or path.count(".") > best[i].count("."):
            best[i] = path
    return {path: nodes[i]["name"] for i, path in best.items()}


def output_quantizers(net: gluon.Block) -> OrderedDict[str, OutputQuantizer]:
    """The block output quantizers of ``net`` (:func:`block_output_points`) by the path of their block."""
    return OrderedDict((p.rpartition(".")[0], b) for p, b in block_paths(net).items() if is_output_quantizer(b))


def _add_output_quantizers(net: gluon.HybridBlock, points: dict[str, str], cfgs: dict[str, LayerConfig],
                           prof: Profile, algorithm: str, momentum: float) -> None:
    """Give each block of ``points`` its :class:`OutputQuantizer`, on the output grid (and with the input mode
    and start step) of the first layer inside it whose output is quantized; a block without one gets none."""
    from dataclasses import replace

    pm = prefix_map(net)
    tensors = {path: node_path(name, pm) for path, name in points.items()}
    for bpath in sorted(points, key=lambda p: -p.count(".")):  # innermost first
        paths = block_paths(net)
        inner = [c for p, c in cfgs.items() if p.startswith(bpath + ".") and c.output is not None and c.quantized]
        if not inner:
            continue
        ref = inner[0]
        qcfg = replace(ref, name=bpath, op_type=type(paths[bpath]).__name__, weight=None, input=None,
                       fake_bn=False, output_relu=False)
        ctx = paths[ref.name].weight.list_ctx()
        with paths[bpath].name_scope():
            q = OutputQuantizer(qcfg, prof, algorithm, momentum, tensors[bpath], ctx=ctx)
        _replace_child(*_parent_of(paths, bpath), with_output_quantizer(paths[bpath], q))


def _clear_cache(net: gluon.Block) -> None:
    blocks = list(block_paths(net).values())
    _plain_storage(*net.collect_params().values())
    mx.nd.waitall()
    for b in blocks:
        if isinstance(b, gluon.HybridBlock):
            b._clear_cached_op()


def _plain_storage(*params: gluon.Parameter) -> None:
    """Rewrite arrays in place so they hold plain (default-layout) storage. MXNet's oneDNN kernels keep
    weights and statistics in their own layouts after an inference pass; the quantized graph (reshapes of the
    weights, the native BatchNorm that updates state) then crashed on such arrays. Called on every switch
    between the fp32 and the quantized graph."""
    for prm in params:
        if prm._data is not None:
            prm._data = [mx.nd.array(a.asnumpy(), ctx=a.context, dtype=a.dtype) for a in prm._data]
            if prm.grad_req != "null":
                prm._init_grad()  # attach gradient buffers to the new arrays


def quantize(net: gluon.HybridBlock, config_list: list[dict[str, Any]] | None = None,
             profile: str | Profile = "ncnn", algorithm: str = "qat", ema_momentum: float = 0.9
             ) -> gluon.HybridBlock:
    """Swap Conv2D/Dense layers of ``net`` for fake-quantized ones, in place, and return ``net``.

    Args:
        net: a Gluon HybridBlock (a gluoncv model or your own), initialised with known shapes.
        config_list: which layers and how (see ``deployq.config``); default: weights and inputs of every
            Conv2D and Dense on the profile's grid, plus the outputs the profile's ``quantize_outputs`` picks
            (``onnx``: the layer outputs of :func:`output_points` and the block outputs of
            :func:`block_output_points`; not with ``bnn``). An output quantizes once its range is set (by
            training or ``deployq.layerwise.calibrate_minmax``/``calibrate_outputs``); until then it stays float.
        profile: ``ncnn``, ``tengine``, ``onnx``, ``custom`` or a Profile: the engine's integer grid, rounding
            and scale convention, used by the simulation and by training.
        algorithm: ``naive``, ``qat``, ``dorefa``, ``lsq``, ``bnn``, ``observer`` or a name registered with
            :func:`deployq.register_quantizer` (``deployq.quantizers``).
        ema_momentum: momentum of the tracked input ranges (first training batch initialises them).
    """
    quantizer = get_quantizer(algorithm)  # ValueError naming the registered algorithms
    prof = load_profile(profile)
    if quant_layers(net):
        raise ValueError("net is already quantized (it has deployq quantized layers)")
    paths = block_paths(net)
    layers: dict[str, tuple[str, bool]] = {}
    for path, b in paths.items():
        t = _float_type(b)
        if t is None or not path:
            continue
        groups = int(b._kwargs.get("num_group", 1)) if t is nn.Conv2D else 1
        depthwise = t is nn.Conv2D and groups > 1 and groups == int(b._channels)
        layers[path] = (t.__name__, depthwise, t is nn.Conv2D and 1 < groups < int(b._channels))
    cfgs = resolve(config_list, layers, prof)
    pairs = conv_bn_pairs(net) if any(c.fake_bn and c.weight is not None for c in cfgs.values()) else {}
    if prof.quantize_outputs == "non_layer_consumers" and quantizer.block_outputs:
        folded = {p: b for p, b in pairs.items() if cfgs[p].quantized and cfgs[p].fake_bn
                  and cfgs[p].weight is not None}
        cfgs = resolve(config_list, layers, prof, output_points(net, folded))
        block_points = block_output_points(net)
    else:
        block_points = {}
    if prof.winograd_3x3 == "six_bit":
        cfgs = {k: _six_bit(c, paths[k]) for k, c in cfgs.items()}
    relus = input_relus(net, cfgs)
    for readers in relus.values():
        for r in readers:
            cfgs[r] = dataclasses.replace(cfgs[r], input_relu=True)
    for path, cfg in cfgs.items():
        if not cfg.quantized:
            continue
        blk = paths[path]
        bn_path = pairs.get(path) if cfg.fake_bn and cfg.weight is not None else None
        bn = paths[bn_path] if bn_path else None
        q = QUANT_TYPES[_float_type(blk)].from_float(blk, cfg, prof, algorithm, ema_momentum, bn, bn_path)
        _replace_child(*_parent_of(paths, path), q)
        if bn is not None:
            _replace_child(*_parent_of(paths, bn_path), BypassBatchNorm.from_float(bn))
    for act in relus:
        _replace_child(*_parent_of(paths, act), BypassActivation.from_float(paths[act]))
    _add_output_quantizers(net, block_points, cfgs, prof, algorithm, ema_momentum)
    net._deployq = {"profile": prof.name, "profile_options": profile_options(prof), "algorithm": algorithm,
                    "config_list": config_list, "ema_momentum": ema_momentum}
    _clear_cache(net)
    return net


def profile_options(prof: Profile) -> dict[str, Any]:
    """The fields in which ``prof`` differs from the named profile it came from (e.g. ``winograd_3x3``
    changed with ``Profile.with_options``), JSON-able, so that :func:`save`/:func:`load` keep them."""
    try:
        base = load_profile(prof.name)
    except ValueError:
        base = None
    out = {}
    for f in dataclasses.fields(prof):
        v = getattr(prof, f.name)
        if base is None or v != getattr(base, f.name):
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def _saved_profile(meta: dict[str, Any]) -> Profile:
    opts = dict(meta.get("profile_options") or {})
    for grid in ("weight", "activation"):
        if grid in opts:
            opts[grid] = TensorGrid(**opts[grid])
    try:
        base = load_profile(meta["profile"])
    except ValueError:
        return Profile(**opts)
    return base.with_options(**opts) if opts else base


def _six_bit(cfg: LayerConfig, blk: gluon.Block) -> LayerConfig:
    """ncnn2table's rule: 3x3 stride-1 dilation-1 Convolution (not depthwise) gets 6-bit weights (codes ±31)."""
    from dataclasses import replace

    kw = getattr(blk, "_kwargs", {})
    if (cfg.weight is not None and cfg.op_type == "Conv2D" and tuple(kw.get("kernel", ())) == (3, 3)
            and tuple(kw.get("stride", (1, 1))) == (1, 1) and tuple(kw.get("dilate", (1, 1))) == (1, 1)
            and int(kw.get("num_group", 1)) == 1):
        return replace(cfg, weight=replace(cfg.weight, bits=min(cfg.weight.bits, 6)))
    return cfg


def quant_layers(net: gluon.Block) -> OrderedDict[str, gluon.Block]:
    """The quantized layers of ``net`` by structural name."""
    return OrderedDict((p, b) for p, b in block_paths(net).items() if is_quant_block(b))


@contextlib.contextmanager
def float_mode(net: gluon.Block):
    """Within this context the quantized net computes exactly its original fp32 graph."""
    blocks = list(block_paths(net).values())
    saved = [(b, b._dq_float) for b in blocks if is_quant_block(b) or is_output_quantizer(b)]
    bns = [b for b in blocks if isinstance(b, _Bypass)]
    for b, _ in saved:
        b._dq_float = True
        if is_quant_block(b):
            b.sync_batchnorm()
    for b in bns:
        b._dq_bypass = False
    _clear_cache(net)
    try:
        yield net
    finally:
        for b, v in saved:
            b._dq_float = v
        for b in bns:
            b._dq_bypass = True
        _clear_cache(net)


def use_native(net: gluon.Block, enabled: bool | None = True) -> gluon.Block:
    """Compute the quantized layers with deployq's fused operators (``deployq.native``; the default where they
    load) or, with ``enabled=False``, with plain MXNet operators: identical results, slower training, and a
    symbol from ``net.export`` that loads in an MXNet without deployq. Returns ``net``."""
    for b in [*quant_layers(net).values(), *output_quantizers(net).values()]:
        b.use_native = None if enabled else False
    _clear_cache(net)
    return net


def fingerprint(net: gluon.HybridBlock) -> str:
    """Structure fingerprint of the fp32 graph (equal for the net and its json/params export)."""
    with float_mode(net):
        return structure_fingerprint(trace_symbol(net).tojson())


def _grid_text(g) -> str:
    if g is None:
        return "-"
    return f"{'int' if g.signed else 'uint'}{g.bits} {g.granularity}{'' if g.symmetric else ' affine'}"


def describe(net: gluon.Block) -> str:
    """A table of every Conv2D/Dense layer with the configuration it got."""
    rows = [("layer", "type", "weight", "input", "output", "input mode", "fake BN", "start", "entry")]
    for path, b in block_paths(net).items():
        if is_quant_block(b):
            c = b.layer_config
            out = _grid_text(c.output) + (" after ReLU" if c.output_relu else "")
            fbn = b.bn_path or "-"
            if b.bn_path and c.bn_freeze_step is not None:
                fbn += f" (frozen at step {c.bn_freeze_step})"
            inp = _grid_text(c.input) + (" (ReLU fused)" if c.input_relu else "")
            rows.append((path, c.op_type, _grid_text(c.weight), inp, out,
                         c.input_mode, fbn, str(c.quant_start_step), str(c.entry)))
        elif _float_type(b) is not None and path:
            rows.append((path, _float_type(b).__name__, "fp32", "fp32", "-", "-", "-", "-", "excluded"))
        elif is_output_quantizer(b):
            c = b.layer_config
            rows.append((path, f"{c.op_type} output", "-", "-", _grid_text(c.output), c.input_mode, "-",
                         str(c.quant_start_step), "profile"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    info = getattr(net, "_deployq", None)
    head = f"profile={info['profile']} algorithm={info['algorithm']}\n" if info else ""
    return head + "\n".join(lines)


def scale_layer_entry(blk: gluon.Block) -> dict[str, Any]:
    """The scale file's ``layers`` entry of a quantized layer (docs/design.md)."""
    c = blk.layer_config
    return {"quantized": True,
            "weight_bits": int(c.weight.bits) if c.weight else None,
            "weight_granularity": str(c.weight.granularity) if c.weight else None,
            "input_quantized": c.input is not None,
            "fake_bn": blk.bn_path}


def export_scales(net: gluon.HybridBlock, model_name: str = "", method: str = "tracked") -> dict[str, Any]:
    """The scale file (``deployq.scales`` v1, docs/design.md) of a quantized net as a dict: one ``<layer>:input``
    entry per layer with a quantized input, holding the range the simulation uses.

    A range set by ``deployq.calib.apply`` (and not changed since) keeps its calibration's method, samples,
    data hash, observed range and clipped share; any other range (tracked during QAT, set by hand) is written
    with ``method`` and those fields null (an ``observer`` net's tracked min/max is its observed range).
    The dict passes ``deployq.calib.ScaleFile.from_dict``; ``json.dumps(d, indent=2, sort_keys=True)``
    gives the same bytes as ``ScaleFile.to_json``."""
    from . import __version__
    from .calib.collect import tap_points, trace
    from .calib.scalefile import ScaleFile, TensorRange

    info = getattr(net, "_deployq", {})
    record = info.get("calibration") or {}
    q = quant_layers(net)
    with float_mode(net):
        sym = trace(net)
        fp = structure_fingerprint(sym.tojson())
        tensor_of = {p.layer: p.tensor for p in tap_points(sym, net, list(q))}
    sf = ScaleFile(model_name, fp, info.get("profile", ""),
                   f"deployq {__version__} export_scales ({info.get('algorithm')})")
    for path, b in q.items():
        sf.layers[path] = scale_layer_entry(b)
        g = b.layer_config.input
        if g is None:
            continue
        lo, hi = b.input_range()
        rec = record.get(path)
        if rec is not None and list(rec.get("range", ())) == [lo, hi]:
            m = rec["method"]
            prov = {k: rec.get(k) for k in ("samples", "data_hash", "observed_min", "observed_max", "clipped_share")}
        else:
            m, prov = method, {}
            if b.quantizer.observer and float(b.input_state.data().asnumpy()[2]) > 0.5:
                prov = {"observed_min": lo, "observed_max": hi}
        sf.tensors[f"{path}:input"] = TensorRange.on_grid(path, "input", tensor_of[path], m,
                                                          b.input_threshold(), lo, hi, g, **prov)
    return sf.validate().to_dict()


# ---------------------------------------------------------------------- save / load

QNET_FORMAT = "deployq.qnet/1"


def architecture(net: gluon.Block, model_name: str = "") -> dict[str, Any] | None:
    """How :func:`load` rebuilds ``net``: a gluoncv model by name and classes, or the symbol JSON of a
    :class:`~deployq.symbolnet.SymbolNet` (any MXNet export). None: a Python HybridBlock deployq cannot rebuild."""
    from .symbolnet import SymbolNet

    if isinstance(net, SymbolNet):
        return {"kind": "symbol", "symbol": json.loads(net.symbol_json), "input_shape": list(net.input_shape)}
    arch = getattr(net, "_deployq_arch", None)
    return dict(arch) if arch else None


def save(net: gluon.HybridBlock, path: str | os.PathLike, model_name: str = "",
         input_shape: tuple[int, ...] | None = None, preprocess: Any = None) -> tuple[Path, Path]:
    """Save a quantized net: ``<path>.params`` (weights, tracked ranges, steps) and ``<path>.deployq.json``
    (profile, algorithm, config list, the architecture (gluoncv name + classes, or the symbol JSON), input shape
    and preprocessing), both written to temporary names and renamed into place."""
    info = getattr(net, "_deployq", None)
    if info is None:
        raise ValueError("not a deployq-quantized net (call deployq.quantize first)")
    if preprocess is not None:
        input_shape = input_shape or preprocess.input_shape
    input_shape = tuple(input_shape or getattr(net, "input_shape", None) or (1, 3, 32, 32))
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    params, meta = Path(f"{base}.params"), Path(f"{base}.deployq.json")
    tmp, meta_tmp = Path(f"{base}.params.tmp{os.getpid()}"), Path(f"{base}.json.tmp{os.getpid()}")
    doc = {**info, "model": model_name, "input_shape": list(input_shape), "format": QNET_FORMAT,
           "architecture": architecture(net, model_name)}
    if preprocess is not None:
        doc["preprocess"] = preprocess.to_dict()
    try:
        net.save_parameters(str(tmp))
        meta_tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, params)
        os.replace(meta_tmp, meta)
    finally:
        for t in (tmp, meta_tmp):
            t.unlink(missing_ok=True)
    return params, meta


def _qnet_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    base = str(path)
    for suffix in (".params", ".deployq.json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return Path(f"{base}.deployq.json"), Path(f"{base}.params")


def read_qnet_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``.deployq.json`` of a saved quantized net."""
    from .errors import InputError

    meta_path, params = _qnet_paths(path)
    for p in (meta_path, params):
        if not p.exists():
            raise InputError("missing (a saved quantized net is <name>.params + <name>.deployq.json)", where=p)
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", where=meta_path) from None
    if not isinstance(meta, dict) or meta.get("format") != QNET_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"unknown format {got!r}; expected {QNET_FORMAT!r}", where=meta_path)
    for key in ("config_list", "algorithm", "profile", "input_shape"):
        if key not in meta:
            raise InputError(f"missing key {key!r}", where=meta_path)
    return meta


def _rebuild(meta: dict[str, Any], where: Path) -> gluon.HybridBlock:
    from .errors import InputError

    arch = meta.get("architecture")
    if arch is None and meta.get("model"):  # saved before architectures were recorded: a built-in model
        arch = {"kind": "gluoncv", "name": meta["model"], "classes": 10}
    if not arch:
        raise InputError("saved from a Python HybridBlock deployq cannot rebuild", where=where,
                         fix="pass the fp32 net: deployq.load(path, net=MyNet()), or export it with "
                             "HybridBlock.export and quantize it from --symbol/--params")
    if arch.get("kind") == "symbol":
        from .symbolnet import SymbolNet

        return SymbolNet.from_json(json.dumps(arch["symbol"]), tuple(arch.get("input_shape") or meta["input_shape"]),
                                   source=f"{where} (symbol)")
    if arch.get("kind") == "gluoncv":
        from .zoo import get_model

        try:
            return get_model(arch["name"], classes=int(arch.get("classes", 10)))
        except ValueError as e:
            raise InputError(str(e), where=where) from None
    raise InputError(f"unknown architecture kind {arch.get('kind')!r}", where=where)


def load(path: str | os.PathLike, net: gluon.HybridBlock | None = None,
         ctx: mx.Context | None = None) -> gluon.HybridBlock:
    """Load a net saved with :func:`save`, for any architecture: a gluoncv model is rebuilt by name and class
    count, an MXNet export from its stored symbol. ``net``: a fresh fp32 net of the same architecture instead
    (for a Python HybridBlock that is neither)."""
    return load_saved(path, net, ctx)[0]


def load_saved(path: str | os.PathLike, net: gluon.HybridBlock | None = None, ctx: mx.Context | None = None
               ) -> tuple[gluon.HybridBlock, dict[str, Any], Any]:
    """(net, metadata, Preprocess or None) of a saved quantized net; errors name the file."""
    from .errors import InputError
    from .preprocess import Preprocess

    meta_path, params = _qnet_paths(path)
    meta = read_qnet_meta(path)
    if net is None:
        net = _rebuild(meta, meta_path)
    ctx = ctx or mx.cpu()
    shape = tuple(meta["input_shape"])
    try:
        if not net._collect_params_with_prefix() or any(p._data is None for p in net.collect_params().values()):
            net.initialize(ctx=ctx, force_reinit=False)
            net(mx.nd.zeros(shape, ctx=ctx))
        quantize(net, meta["config_list"], _saved_profile(meta), meta["algorithm"], meta["ema_momentum"])
    except (mx.base.MXNetError, KeyError, TypeError) as e:
        raise InputError(f"cannot rebuild the quantized net ({type(e).__name__}: {str(e).strip()[:200]})",
                         where=meta_path) from None
    try:
        saved = mx.nd.load(str(params))
    except mx.base.MXNetError as e:
        raise InputError(f"not a readable MXNet .params file ({short_message(e)[:160]})",
                         where=params) from None
    # a net saved before its profile quantized outputs lacks their state: those outputs stay unquantized
    missing = set(net._collect_params_with_prefix()) - set(saved)
    optional = all(k.rpartition(".")[2].startswith("output_state") for k in missing)
    try:
        net.load_parameters(str(params), ctx=ctx, allow_missing=bool(missing) and optional)
    except (AssertionError, mx.base.MXNetError, ValueError) as e:
        msg = short_message(e)[:200] if str(e).strip() else "parameters do not fit the architecture"
        raise InputError(f"its weights do not fit the architecture in {meta_path.name} ({msg})", where=params,
                         fix="save and load the .params and .deployq.json of one quantized net together") from None
    if meta.get("calibration"):
        net._deployq["calibration"] = meta["calibration"]  # where calibrated ranges came from (export_scales)
    pre = Preprocess.from_dict(meta["preprocess"], f"{meta_path}: preprocess") if meta.get("preprocess") else None
    if pre is None:
        from .preprocess import mnist

        pre = mnist(shape) if meta.get("model") in ("mobilenet0.25", "resnet20") else None
    if pre is not None and tuple(pre.input_shape) != shape:
        pre = pre.with_shape(shape)
    return net, meta, pre


# ---------------------------------------------------------------------- training

class Trainer(gluon.Trainer):
    """A gluon.Trainer for QAT. After every step it keeps tracked ranges identical on every context (exact:
    the elementwise min/max of the per-context moving averages equals the moving average of the whole batch's
    min/max), averages fake-BN running statistics across contexts, and initialises LSQ input steps from the
    first tracked range."""

    def step(self, batch_size, ignore_stale_grad=False):
        # sync first: gluon's first step initialises its kvstore from context 0 and broadcasts it
        self.sync()
        super().step(batch_size, ignore_stale_grad)

    def sync(self) -> None:
        by_name = {p.name: p for p in self._params}
        for name, p in by_name.items():
            if name.endswith("input_state") or name.endswith("output_state"):
                arrs = p.list_data()
                if len(arrs) > 1:
                    stack = mx.nd.stack(*[a.as_in_context(arrs[0].context) for a in arrs])
                    mins, maxs = stack.min(axis=0), stack.max(axis=0)
                    merged = mx.nd.concat(mins[0:1], maxs[1:4], dim=0)
                    for a in arrs:
                        a[:] = merged.as_in_context(a.context)
                if name.endswith("input_state"):
                    lsq = by_name.get(name[: -len("input_state")] + "input_lsq_step")
                    if lsq is not None and float(lsq.data().asnumpy()[0]) <= 0:
                        st = p.data().asnumpy()
                        blk_signed = st[0] < 0
                        t = max(abs(st[0]), abs(st[1])) if blk_signed else max(st[1], 0.0)
                        lsq.set_data(mx.nd.array([t / 127.0 if t > 0 else 1e-3]))
            elif name.endswith("fakebn_mean") or name.endswith("fakebn_var"):
                arrs = p.list_data()
                if len(arrs) > 1:
                    mean = mx.nd.add_n(*[a.as_in_context(arrs[0].context) for a in arrs]) / len(arrs)
                    for a in arrs:
                        a[:] = mean.as_in_context(a.context)
