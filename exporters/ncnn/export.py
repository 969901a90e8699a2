"""``export-ncnn`` end to end: graphs -> Caffe pair, ncnn table, direct fp32/int8 ncnn models, scale file,
plus what ``deployq verify`` needs (the ``deployq-export.json`` manifest and the saved quantized net, or for
the json/params route a copy of the fp32 MXNet files).

Every file is built in memory first (the saved net through a scratch folder outside the export), then written
into a temporary sibling folder that replaces the export folder as a whole (``deployq.atomic.export_dir``): the
folder holds the whole new export or, after an error, the previous one (a fresh folder is not created).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from deployq.exporters.ir.annotate import graph_fingerprint, load_scale_file
from deployq.exporters.ir.frontend import from_files, from_gluon
from deployq.exporters.ir.graph import Graph, GraphError, UnsupportedOpError
from deployq.exporters.ir.passes import optimize
from deployq.exporters.ir.qattach import attach_qnet, attach_scales
from deployq.exporters.ncnn.caffe import prototxt_text, to_caffe
from deployq.exporters.ncnn.lower import NcnnModel, lower, scale_table
from deployq.exporters.ncnn.write import bin_bytes, param_text, table_text

SUFFIXES = {"prototxt": ".prototxt", "caffemodel": ".caffemodel", "table": ".table",
            "fp32_param": ".param", "fp32_bin": ".bin", "int8_param": "-int8.param", "int8_bin": "-int8.bin",
            "scales": ".scales.json"}
#: the files ``deployq verify`` needs besides SUFFIXES: the saved quantized net (``--model``/``--qnet``) or
#: the fp32 MXNet model (``--symbol``: verify rebuilds the simulation from it and the scale file)
QNET_SUFFIXES = {"qnet_params": "-qnet.params", "qnet_meta": "-qnet.deployq.json"}
FILES_SUFFIXES = {"symbol": "-symbol.json", "params": "-0000.params"}
MANIFEST_KEY = "manifest"


class CaffeSkippedWarning(UserWarning):
    """The graph has an op that Caffe cannot express: the Caffe pair was not written (the ncnn files were)."""


class Int8SkippedWarning(UserWarning):
    """A layer cannot be written in ncnn's int8: the int8 model, the table and the Caffe pair were not written;
    the fp32 model, the scale file and what verify needs were (the manifest's ``int8_refused`` says why)."""


def minmax_calibrate(qnet: Any, x: np.ndarray) -> None:
    """Set every quantized layer's input range to the min/max of its fp32 input over images ``x``."""
    from deployq.exporters.ir.mxnet_lower import run

    from deployq import quant_layers

    g = from_gluon(qnet, (1,) + tuple(x.shape[1:]))
    layers = quant_layers(qnet)
    inputs = {path: g.node(path).inputs[0] for path in layers}
    acts = run(g, x, outputs=sorted(set(inputs.values())))
    for path, blk in layers.items():
        a = acts[inputs[path]]
        blk.set_input_range(float(a.min()), float(a.max()))


def balanced_images(n_per_class: int = 20, split: str = "train") -> np.ndarray:
    """The first ``n_per_class`` images of every class of MNIST-5k ``split`` (calibration set)."""
    from deployq.data import load_mnist5k

    d = load_mnist5k(split)
    idx = np.concatenate([np.flatnonzero(d.y == c)[:n_per_class] for c in np.unique(d.y)])
    return d.x[np.sort(idx)]


def qnet_graphs(qnet: Any, name: str, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> tuple[Graph, Graph]:
    """(optimized fp32 graph, same graph with the quantized net's exact weights and grids)."""
    g = optimize(from_gluon(qnet, input_shape, name))
    return g, attach_qnet(g, qnet)


def file_graphs(symbol: str | Path, params: str | Path, scales: dict[str, Any], scales_path: str,
                input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> tuple[Graph, Graph]:
    raw = from_files(symbol, params, input_shape)
    want = (scales.get("model") or {}).get("fingerprint")
    have = graph_fingerprint(raw)
    if want and want != have:
        raise GraphError(f"{scales_path}: scale file is for another model (fingerprint {want[:20]}..., "
                         f"{symbol} has {have[:20]}...)")
    g = optimize(raw)
    return g, attach_scales(g, scales, "ncnn")


def _safe_graphs(g: Graph, gq: Graph) -> tuple[Graph, Graph, dict[str, str]]:
    """Both graphs with the names ncnn's text formats cannot hold renamed (the same map: same node names)."""
    from deployq.exporters.ir.safenames import safe_names

    g, renamed = safe_names(g)
    return g, safe_names(gq)[0], renamed


def _report_fp32(g: Graph, gq: Graph, where: str) -> None:
    """Refuse a scale file that quantizes none of the Conv/FC layers; warn (:class:`Fp32LayersWarning`) naming
    those it leaves in fp32."""
    from deployq.checks import Fp32LayersWarning, fp32_layers

    left = fp32_layers([n.name for n in g.nodes if n.op in ("Convolution", "FullyConnected")],
                       [n.name for n in gq.nodes if "quant_layer" in n.attrs], where)
    if left:
        warnings.warn(f"{where}: no input range for {len(left)} Conv/FC layer(s), kept in fp32: {', '.join(left)}",
                      Fp32LayersWarning, stacklevel=3)


def layer_outputs(int8: NcnnModel, gq: Graph) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """For ``deployq verify``: each quantized layer's ncnn blob, and how that blob relates to the layer's
    simulated output (Conv/FC output, BN folded, before the activation): ``activation`` = ``[activation_type,
    *activation_params]`` fused into the ncnn layer (0 = none), ``int8_multiplier`` = the top scale when the
    blob holds int8 codes (requantize fusion: ``float2int8(act(y) * multiplier)``), else None."""
    blobs, info = {}, {}
    for node in gq.nodes:
        path = node.attrs.get("quant_layer")
        if path is None:
            continue
        rec = int8.layer(node.name)
        term = int(rec.params.get(8, 0))
        act = rec.params.get(9, 0)
        blobs[path] = rec.tops[0]
        info[path] = {"activation": [int(act), *(float(v) for v in rec.params.get(10, ()))] if act else [0],
                      "int8_multiplier": float(rec.weights[-1].data[0]) if term > 100 else None}
    return blobs, info


def output_blobs(model: NcnnModel) -> list[str]:
    """Blobs no layer reads, in layer order (what ncnn's ``Net.output_names()`` lists)."""
    read = {b for ly in model.layers for b in ly.bottoms}
    return [t for ly in model.layers for t in ly.tops if t not in read]


def render(g: Graph, gq: Graph, scales: dict[str, Any]) -> tuple[dict[str, bytes], NcnnModel | None, str | None]:
    """Every export file's bytes keyed like :data:`SUFFIXES`, the int8 model and why it was refused (or None).
    The Caffe pair is left out, with a :class:`CaffeSkippedWarning` naming the layer, when Caffe cannot express
    an op of the graph; when a layer cannot be written in int8, only the fp32 model and the scale file are
    (:class:`Int8SkippedWarning`; int8 model None, the reason third)."""
    fp32 = lower(g, int8=False)
    scales_bytes = (json.dumps(scales, indent=2, sort_keys=True) + "\n").encode()
    try:
        int8 = lower(gq, int8=True)
    except (GraphError, UnsupportedOpError) as e:  # one layer's int8 refusal never blocks the fp32 model
        warnings.warn(f"int8 model not written: {e}. Written: the fp32 model (.param/.bin) and the scale file; "
                      "not written: the int8 model, the table and the Caffe pair", Int8SkippedWarning, stacklevel=3)
        return ({"fp32_param": param_text(fp32).encode(), "fp32_bin": bin_bytes(fp32), "scales": scales_bytes},
                None, str(e))
    out: dict[str, bytes] = {}
    try:
        net = to_caffe(gq)
    except UnsupportedOpError as e:
        warnings.warn(f"Caffe pair (.prototxt/.caffemodel) not written: {e}. The direct ncnn models and the "
                      "table are written (use the direct int8 model: the table goes with the Caffe pair).",
                      CaffeSkippedWarning, stacklevel=3)
    else:
        out["prototxt"] = prototxt_text(net).encode()
        out["caffemodel"] = net.SerializeToString(deterministic=True)
    out.update({"table": table_text(scale_table(gq)).encode(),
                "fp32_param": param_text(fp32).encode(), "fp32_bin": bin_bytes(fp32),
                "int8_param": param_text(int8).encode(), "int8_bin": bin_bytes(int8), "scales": scales_bytes})
    return out, int8, None


def _manifest(contents: dict[str, bytes], names: dict[str, str], int8: NcnnModel | None, gq: Graph, model: str,
              input_shape: tuple[int, ...], profile: str | None, route: str, preprocess: Any = None,
              renamed: dict[str, str] | None = None, int8_refused: str | None = None) -> bytes:
    import deployq
    from deployq.manifest import manifest_bytes, sha256_bytes

    rel = {"fp32_param": names["fp32_param"], "fp32_bin": names["fp32_bin"], "scales": names["scales"]}
    if int8 is not None:
        rel.update(param=names["int8_param"], bin=names["int8_bin"], table=names["table"])
    if "qnet_params" in contents:
        rel["qnet"] = names["qnet_params"].removesuffix(".params")
    else:
        rel["symbol"], rel["params"] = names["symbol"], names["params"]
    if "prototxt" in contents:
        rel["prototxt"], rel["caffemodel"] = names["prototxt"], names["caffemodel"]
    if "usage" in contents:
        rel["usage"] = names["usage"]
    extra = {"preprocess": {**preprocess.to_dict(), "ncnn": preprocess.ncnn()}} if preprocess is not None else {}
    if renamed:
        extra["safe_names"] = renamed  # original -> name in the .param/.table files (exporters.ir.safenames)
    if int8 is None:
        blobs, info, outs = {}, {}, output_blobs(lower(gq, int8=False))
        extra["int8_refused"] = int8_refused
    else:
        (blobs, info), outs = layer_outputs(int8, gq), output_blobs(int8)
    sha = sha256_bytes({names[k]: v for k, v in contents.items() if k != MANIFEST_KEY})
    return manifest_bytes("ncnn", model, input_shape, rel, blobs, f"deployq {deployq.__version__} export-ncnn "
                          f"({route})", sha, profile=profile or "ncnn", outputs=outs, layer_outputs=info, **extra)


def write_all(contents: dict[str, bytes], out_dir: str | Path, names: dict[str, str]) -> dict[str, Path]:
    """Write every file into a temporary sibling of ``out_dir`` that is swapped in as a whole
    (:func:`deployq.atomic.export_dir`): ``out_dir`` holds the whole new export, or after an error the previous
    one, untouched."""
    from deployq.atomic import export_dir, safe_stem

    for k in contents:
        safe_stem(names[k], f"file name of {k!r}")
    out = Path(out_dir)
    with export_dir(out) as tmp:
        for k, data in contents.items():
            (tmp / names[k]).write_bytes(data)
    return {k: out / names[k] for k in contents}


def _names(stem: str, keys: Any) -> dict[str, str]:
    table = {**SUFFIXES, **QNET_SUFFIXES, **FILES_SUFFIXES}
    names = {k: f"{stem}{table[k]}" for k in keys if k not in (MANIFEST_KEY, "usage")}
    names[MANIFEST_KEY] = "deployq-export.json"
    names["usage"] = "USAGE.txt"
    return names


def _qnet_bytes(qnet: Any, model_name: str, input_shape: tuple[int, ...], preprocess: Any = None
                ) -> dict[str, bytes]:
    """``deployq.save`` output, through a scratch folder outside the export."""
    import deployq

    with tempfile.TemporaryDirectory(prefix="deployq-qnet-") as d:
        params, meta = deployq.save(qnet, Path(d) / "qnet", model_name=model_name, input_shape=input_shape,
                                    preprocess=preprocess)
        return {"qnet_params": params.read_bytes(), "qnet_meta": meta.read_bytes()}


def _usage(contents: dict[str, bytes], names: dict[str, str], preprocess: Any) -> None:
    from deployq.preprocess import usage_text

    if preprocess is not None:
        contents["usage"] = usage_text(preprocess, "ncnn", names).encode()


def export_qnet(qnet: Any, out_dir: str | Path, name: str = "model",
                input_shape: tuple[int, ...] | None = None, model_name: str | None = None,
                preprocess: Any = None) -> dict[str, Path]:
    """Export a deployq-quantized net; returns {key: path} of every file written (manifest included).
    ``model_name``: the model's name in the manifest (default ``name``); ``preprocess``: a
    :class:`deployq.preprocess.Preprocess` stated in the manifest and ``USAGE.txt`` (its input shape is the
    model's, unless ``input_shape`` is given)."""
    input_shape = tuple(input_shape or (preprocess.input_shape if preprocess is not None else (1, 3, 32, 32)))
    from deployq import export_scales

    g, gq, renamed = _safe_graphs(*qnet_graphs(qnet, name, input_shape))
    contents, int8, refused = render(g, gq, export_scales(qnet, model_name or name))
    contents.update(_qnet_bytes(qnet, model_name or name, input_shape, preprocess))
    names = _names(name, [*contents, "usage", MANIFEST_KEY])
    _usage(contents, names, preprocess)
    profile = getattr(qnet, "_deployq", {}).get("profile")
    contents[MANIFEST_KEY] = _manifest(contents, names, int8, gq, model_name or name, input_shape, profile,
                                       "quantized net", preprocess, renamed, refused)
    return write_all(contents, out_dir, names)


def export_files(symbol: str | Path, params: str | Path, scales_path: str | Path, out_dir: str | Path,
                 name: str | None = None, input_shape: tuple[int, ...] | None = None,
                 preprocess: Any = None) -> dict[str, Path]:
    """Export an MXNet json/params pair with a scale file; the pair is copied into the export (as
    ``<name>-symbol.json``/``<name>-0000.params``) so that ``deployq verify`` can rebuild the simulation."""
    scales = load_scale_file(scales_path)
    input_shape = tuple(input_shape or (preprocess.input_shape if preprocess is not None else (1, 3, 32, 32)))
    name = name or Path(symbol).name.removesuffix(".json").removesuffix("-symbol")
    g, gq = file_graphs(symbol, params, scales, str(scales_path), input_shape)
    _report_fp32(g, gq, str(scales_path))
    g, gq, renamed = _safe_graphs(g, gq)
    contents, int8, refused = render(g, gq, scales)
    contents["symbol"], contents["params"] = Path(symbol).read_bytes(), Path(params).read_bytes()
    names = _names(name, [*contents, "usage", MANIFEST_KEY])
    _usage(contents, names, preprocess)
    model = (scales.get("model") or {}).get("name") or name
    contents[MANIFEST_KEY] = _manifest(contents, names, int8, gq, model, input_shape, "ncnn",
                                       "json/params + scale file", preprocess, renamed, refused)
    return write_all(contents, out_dir, names)
