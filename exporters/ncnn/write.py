"""ncnn layer records -> ``.param`` text (jinja2 template), ``.bin`` bytes and the calibration table text.

No decisions here: types, params, weight order and tags all come from ``exporters.ncnn``.
"""

from __future__ import annotations

import struct
from functools import cache
from importlib import resources

import jinja2
import numpy as np
from deployq.exporters.ncnn.lower import LayerRecord, NcnnModel, ParamValue


@cache
def _template(name: str) -> jinja2.Template:
    text = resources.files("deployq.templates").joinpath(name).read_text()
    env = jinja2.Environment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)
    return env.from_string(text)


def format_float(v: float) -> str:
    """A float param as ncnn parses it: always with a ``.`` or an exponent (``6.000000000e+00``)."""
    return f"{float(np.float32(v)):.9e}"


def format_param(key: int, value: ParamValue) -> tuple[str, str]:
    """``(key, text)`` of one param: arrays as ``-(23300+id)=n,v,...``, floats per :func:`format_float`."""
    if isinstance(value, tuple | list):
        items = [str(int(v)) if isinstance(v, int | np.integer) else format_float(v) for v in value]
        return str(-23300 - key), ",".join([str(len(items)), *items])
    if isinstance(value, bool | int | np.integer):
        return str(key), str(int(value))
    return str(key), format_float(value)


def param_text(model: NcnnModel) -> str:
    layers = [{"type": ly.type, "name": ly.name, "bottoms": ly.bottoms, "tops": ly.tops,
               "params": [format_param(k, v) for k, v in ly.params.items()]} for ly in model.layers]
    return _template("ncnn_param.j2").render(layers=layers, blob_count=model.blob_count)


def _layer_bytes(ly: LayerRecord) -> bytes:
    out = bytearray()
    for wb in ly.weights:
        if wb.tag is None:
            out += np.ascontiguousarray(wb.data, "<f4").tobytes()
            continue
        out += struct.pack("<I", wb.tag)
        raw = np.ascontiguousarray(wb.data, "<f4" if wb.data.dtype != np.int8 else np.int8).tobytes()
        out += raw + b"\0" * (-len(raw) % 4)
    return bytes(out)


def bin_bytes(model: NcnnModel) -> bytes:
    return b"".join(_layer_bytes(ly) for ly in model.layers)


def table_text(entries: list[tuple[str, list[float]]]) -> str:
    """ncnn2table format, full precision (``%.9g``), no blank line (ncnn2int8 stops at the first one)."""
    rows = [(k, [f"{v:.9g}" for v in vals]) for k, vals in entries]
    return _template("ncnn_table.j2").render(entries=rows)
