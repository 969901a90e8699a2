"""Serialise a lowered :class:`~deployq.exporters.tengine.TengineExport`: MXNet json/params, Tengine's
scale table, deployq's JSON scale file and the manifest. No decisions here; the export folder appears as a whole
(``deployq.atomic.export_dir``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import mxnet as mx
from deployq.calib.scalefile import ScaleFile, TensorRange
from deployq.exporters.ir.mxnet_lower import to_symbol
from deployq.exporters.tengine.lower import TengineExport

import deployq
from deployq.profiles import TensorGrid


def render_scale_table(exp: TengineExport) -> str:
    """Tengine's ``<tensor> <step> 0`` lines (``%.9g``) from ``templates/tengine_scale.txt.j2``."""
    text = resources.files("deployq.templates").joinpath("tengine_scale.txt.j2").read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(text).render(scales=exp.scales)


#: Tengine's activation grid: symmetric signed int8, codes in [-127, 127]
TENGINE_GRID = TensorGrid(bits=8, signed=True, narrow_range=True, symmetric=True)


def scale_file(exp: TengineExport) -> ScaleFile:
    """deployq's scale file (``deployq.scales`` v1, docs/design.md) with one ``activation`` entry per Tengine
    tensor, keyed by the tensor; ``layer`` is the IR node producing it (null for the graph input). Tensors
    calibrated here (min-max) carry the images, data hash and observed range; tensors whose threshold came
    from a scale file, a quantized net or the softmax rule leave those null."""
    producer = {t: n.name for n in exp.graph.nodes for t in n.outputs}
    sf = ScaleFile(exp.name, exp.fingerprint, "tengine", f"deployq {deployq.__version__} export-tengine")
    for r in exp.scales:
        prov = {}
        if r.source.startswith("calibration"):
            amax = max(abs(r.lo), abs(r.hi))
            prov = {"samples": exp.calib_samples, "data_hash": exp.calib_hash, "observed_min": float(r.lo),
                    "observed_max": float(r.hi), "clipped_share": 0.0 if r.threshold >= amax else None}
        sf.tensors[r.tensor] = TensorRange.on_grid(producer.get(r.tensor), "activation", r.tensor, r.source,
                                                   float(r.threshold), float(r.lo), float(r.hi), TENGINE_GRID,
                                                   **prov)
    for k, s in exp.weight_steps.items():
        sf.layers[k] = {"quantized": True, "weight_bits": 8, "weight_granularity": "channel",
                        "weight_step": [float(v) for v in s]}
    return sf.validate()


def scale_file_dict(exp: TengineExport) -> dict:
    """:func:`scale_file` as a dict."""
    return scale_file(exp).to_dict()


def write(exp: TengineExport, out_dir: str | Path, name: str | None = None, preprocess: Any = None,
          renamed: dict[str, str] | None = None, kernels: str = "x86") -> list[Path]:
    """Write ``<name>-symbol.json``, ``<name>-0000.params`` (legacy float32), ``<name>.scale`` (Tengine table),
    ``<name>.scales.json`` and the manifest ``deployq-export.json`` (with every file's SHA-256) as one export
    folder ``out_dir`` (:func:`deployq.atomic.export_dir`: the whole new export, or after an error the previous
    one); returns the paths of the four model files. ``renamed``: the names :func:`exporters.ir.safenames.safe_names`
    changed (original -> safe), recorded in the manifest as ``safe_names``; ``kernels``: the Tengine kernel family
    the export targets (``kernels.py``), recorded as ``kernels`` (``deployq verify`` runs that family)."""
    from deployq.atomic import export_dir, safe_stem
    from deployq.manifest import MANIFEST, manifest_bytes, sha256_folder

    out_dir, name = Path(out_dir), safe_stem(name or exp.name)
    names = {"symbol": f"{name}-symbol.json", "params": f"{name}-0000.params", "table": f"{name}.scale",
             "scales": f"{name}.scales.json"}
    with export_dir(out_dir) as tmp:
        sym, args, aux = to_symbol(exp.graph)
        sym.save(str(tmp / names["symbol"]))
        params = {f"arg:{k}": args[k].astype("float32") for k in sym.list_arguments() if k in args}
        params.update({f"aux:{k}": aux[k].astype("float32") for k in sym.list_auxiliary_states()})
        mx.nd.save(str(tmp / names["params"]), params)
        (tmp / names["table"]).write_text(render_scale_table(exp))
        (tmp / names["scales"]).write_text(scale_file(exp).to_json())
        extra: dict[str, Any] = {"safe_names": renamed} if renamed else {}
        extra["kernels"] = kernels
        if preprocess is not None:  # the app code's and quant_tool_int8's preprocessing (USAGE.txt)
            from deployq.preprocess import usage_text

            (tmp / "USAGE.txt").write_text(usage_text(preprocess, "tengine", {"scale": names["table"]}))
            extra["preprocess"] = {**preprocess.to_dict(), "tengine": preprocess.tengine()}
        (tmp / MANIFEST).write_bytes(manifest_bytes(
            "tengine", exp.name, exp.graph.input_shape, names, exp.tensor_map,
            f"deployq {deployq.__version__} export-tengine", sha256_folder(tmp), **extra))
    return [out_dir / n for n in names.values()]
