"""Attach quantization thresholds from a deployq scale file (docs/design.md) to the IR's tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deployq.exporters.ir.graph import Graph, GraphError, TensorQuant
from deployq.exporters.ir.mxnet_lower import to_symbol

from deployq.naming import structure_fingerprint

SCHEMA, VERSION = "deployq.scales", 1


def graph_fingerprint(g: Graph) -> str:
    """``deployq.naming.structure_fingerprint`` of the graph's fp32 symbol."""
    return structure_fingerprint(to_symbol(g)[0].tojson())


def load_scale_file(path: str | Path, expect_fingerprint: str | None = None) -> dict[str, Any]:
    """Read a scale file with deployq's one strict loader (``deployq.calib.scalefile.load``: schema, version,
    every field and its type; a ``ScaleFileError`` naming the file, entry and field) and return it as a dict
    (unknown fields written as null)."""
    from deployq.calib.scalefile import load

    return load(path, expect_fingerprint).to_dict()


def check_scales(scales: dict[str, Any], where: str = "scale file") -> None:
    """The minimal check :func:`annotate` makes on an in-memory dict (schema, version, a tensors table);
    files are read with :func:`load_scale_file`, which checks every field."""
    if scales.get("schema") != SCHEMA or scales.get("version") != VERSION:
        raise GraphError(f"{where}: unknown scale-file schema/version {scales.get('schema')!r}/"
                         f"{scales.get('version')!r}; expected {SCHEMA!r}/{VERSION}")
    if not isinstance(scales.get("tensors"), dict):
        raise GraphError(f"{where}: no 'tensors' table")


def annotate(g: Graph, scales: dict[str, Any], where: str = "scale file", check_fingerprint: bool = True,
             fingerprint: str | None = None) -> Graph:
    """A copy of ``g`` whose tensors carry the scale file's thresholds (``Graph.quant``).

    An entry names its tensor by ``tensor`` (``<layer>:input`` keys) or by its key; names are resolved
    through ``g.aliases`` (a BN output folded into its conv). The model fingerprint must match ``fingerprint``
    (default: this graph's). Entries for tensors the graph does not have raise an error naming them.
    """
    check_scales(scales, where)
    if check_fingerprint:
        want = (scales.get("model") or {}).get("fingerprint")
        have = fingerprint or graph_fingerprint(g)
        if want and want != have:
            raise GraphError(f"{where}: scale file is for model {scales['model'].get('name')!r} "
                             f"(fingerprint {want}), not for {g.name!r} ({have})")
    g = g.copy()
    known = set(g.tensors())
    unknown = []
    for key, e in scales["tensors"].items():
        tensor = g.resolve(e.get("tensor") or _layer_input(g, key))
        if tensor not in known:
            unknown.append(key)
            continue
        try:
            t = float(e["threshold"])
        except (KeyError, TypeError, ValueError):
            raise GraphError(f"{where}: entry {key!r} has no numeric 'threshold'") from None
        g.quant[tensor] = TensorQuant(t, float(e.get("lo", -t)), float(e.get("hi", t)), source=where)
    if unknown:
        raise GraphError(f"{where}: entries name tensors that model {g.name!r} does not have: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    return g


def _layer_input(g: Graph, key: str) -> str:
    """``<layer>:input`` -> the layer's input tensor; any other key is a tensor name."""
    if key.endswith(":input"):
        layer = key.removesuffix(":input")
        for n in g.nodes:
            if n.name == layer:
                return n.inputs[0]
        return layer
    return key
