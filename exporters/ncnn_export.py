"""``export-ncnn`` end to end: graphs -> Caffe pair, ncnn table, direct fp32/int8 ncnn models, scale file.

All contents are built in memory first, then written under temporary names and renamed at the end, so an
error leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .annotate import graph_fingerprint, load_scale_file
from .caffe import prototxt_text, to_caffe
from .frontend import from_files, from_gluon
from .ir import Graph, GraphError
from .ncnn import lower, scale_table
from .ncnn_write import bin_bytes, param_text, table_text
from .passes import optimize
from .qattach import attach_qnet, attach_scales

SUFFIXES = {"prototxt": ".prototxt", "caffemodel": ".caffemodel", "table": ".table",
            "fp32_param": ".param", "fp32_bin": ".bin", "int8_param": "-int8.param", "int8_bin": "-int8.bin",
            "scales": ".scales.json"}


def minmax_calibrate(qnet: Any, x: np.ndarray) -> None:
    """Set every quantized layer's input range to the min/max of its fp32 input over images ``x``."""
    from deployq import quant_layers

    from .mxnet_lower import run

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


def render(g: Graph, gq: Graph, scales: dict[str, Any]) -> dict[str, bytes]:
    """Every output file's bytes, keyed like :data:`SUFFIXES`."""
    net = to_caffe(gq)
    fp32, int8 = lower(g, int8=False), lower(gq, int8=True)
    return {"prototxt": prototxt_text(net).encode(), "caffemodel": net.SerializeToString(deterministic=True),
            "table": table_text(scale_table(gq)).encode(),
            "fp32_param": param_text(fp32).encode(), "fp32_bin": bin_bytes(fp32),
            "int8_param": param_text(int8).encode(), "int8_bin": bin_bytes(int8),
            "scales": (json.dumps(scales, indent=2, sort_keys=True) + "\n").encode()}


def write_all(contents: dict[str, bytes], out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write every file under a temporary name, then rename them all (nothing half-written on error)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = {k: out / f"{name}{SUFFIXES[k]}" for k in contents}
    tmps = {k: p.with_name(f".{p.name}.tmp{os.getpid()}") for k, p in final.items()}
    try:
        for k, data in contents.items():
            tmps[k].write_bytes(data)
        for k in contents:
            os.replace(tmps[k], final[k])
    finally:
        for t in tmps.values():
            t.unlink(missing_ok=True)
    return final


def export_qnet(qnet: Any, out_dir: str | Path, name: str = "model",
                input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, Path]:
    from deployq import export_scales

    g, gq = qnet_graphs(qnet, name, input_shape)
    files = write_all(render(g, gq, export_scales(qnet, name)), out_dir, name)
    _write_manifest(qnet, Path(out_dir), name, input_shape, files)
    return files


def _write_manifest(qnet: Any, out: Path, name: str, input_shape: tuple[int, ...], files: dict[str, Path]) -> None:
    """Save the quantized net beside the export and write ``deployq-export.json`` for ``deployq verify``."""
    import ncnn

    import deployq
    from deployq.manifest import write_manifest

    deployq.save(qnet, out / f"{name}-qnet", model_name=name, input_shape=input_shape)
    net = ncnn.Net()
    net.load_param(str(files["int8_param"]))
    outputs = list(net.output_names())
    rel = {"param": files["int8_param"].name, "bin": files["int8_bin"].name, "fp32_param": files["fp32_param"].name,
           "fp32_bin": files["fp32_bin"].name, "table": files["table"].name, "scales": files["scales"].name,
           "qnet": f"{name}-qnet"}
    # no per-layer blobs: ncnn fuses activations into the convolutions and keeps requantized blobs as int8 codes
    write_manifest(out, "ncnn", name, input_shape, rel, {}, f"deployq {deployq.__version__} export-ncnn",
                   profile=getattr(qnet, "_deployq", {}).get("profile"), outputs=outputs)


def export_files(symbol: str | Path, params: str | Path, scales_path: str | Path, out_dir: str | Path,
                 name: str | None = None) -> dict[str, Path]:
    scales = load_scale_file(scales_path)
    name = name or Path(symbol).name.removesuffix(".json").removesuffix("-symbol")
    g, gq = file_graphs(symbol, params, scales, str(scales_path))
    return write_all(render(g, gq, scales), out_dir, name)
