"""Serialise a lowered :class:`~deployq.exporters.tengine.TengineExport`: MXNet json/params, Tengine's
scale table and deployq's JSON scale file. No decisions here; files appear atomically (temporary names, then
rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import jinja2
import mxnet as mx

import deployq

from .mxnet_lower import to_symbol
from .tengine import QMAX, TengineExport


def render_scale_table(exp: TengineExport) -> str:
    """Tengine's ``<tensor> <step> 0`` lines (``%.9g``) from ``templates/tengine_scale.txt.j2``."""
    text = resources.files("deployq.templates").joinpath("tengine_scale.txt.j2").read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(text).render(scales=exp.scales)


def scale_file_dict(exp: TengineExport) -> dict:
    """deployq's scale file (docs/design.md) with one entry per Tengine tensor."""
    tensors = {r.tensor: {"tensor": r.tensor, "kind": "activation", "method": r.source,
                          "threshold": r.threshold, "lo": r.lo, "hi": r.hi, "bits": 8, "signed": True,
                          "zero_point": 0, "step": r.step,
                          "convention": "step = threshold / qmax (int -> float); Tengine scale = step"}
               for r in exp.scales}
    layers = {k: {"quantized": True, "weight_bits": 8, "weight_granularity": "channel",
                  "weight_step": [float(v) for v in s]} for k, s in exp.weight_steps.items()}
    model = {"name": exp.name, "fingerprint": exp.fingerprint}
    return {"schema": "deployq.scales", "version": 1, "model": model,
            "profile": "tengine", "producer": f"deployq {deployq.__version__} export-tengine", "qmax": QMAX,
            "tensors": tensors, "layers": layers}


def write(exp: TengineExport, out_dir: str | Path, name: str | None = None) -> list[Path]:
    """Write ``<name>-symbol.json``, ``<name>-0000.params`` (legacy float32), ``<name>.scale`` (Tengine table)
    and ``<name>.scales.json`` into ``out_dir``; returns the paths. Nothing is left behind on error."""
    out_dir, name = Path(out_dir), name or exp.name
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / f"{name}-symbol.json", "params": out_dir / f"{name}-0000.params",
             "table": out_dir / f"{name}.scale", "scales": out_dir / f"{name}.scales.json"}
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        sym, args, aux = to_symbol(exp.graph)
        sym.save(str(tmp / "json"))
        params = {f"arg:{k}": args[k].astype("float32") for k in sym.list_arguments() if k in args}
        params.update({f"aux:{k}": aux[k].astype("float32") for k in sym.list_auxiliary_states()})
        mx.nd.save(str(tmp / "params"), params)
        (tmp / "table").write_text(render_scale_table(exp))
        (tmp / "scales").write_text(json.dumps(scale_file_dict(exp), indent=1, sort_keys=True) + "\n")
        for key, path in files.items():
            os.replace(tmp / key, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return list(files.values())
