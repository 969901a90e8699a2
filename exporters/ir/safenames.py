"""Names the engines' text formats can hold: ncnn ``.param``/``.table`` and Tengine ``.scale`` files are
whitespace-separated tokens of at most 255 bytes, read by C parsers, so a layer or tensor called ``conv 1``,
``a#b``, ``a=b`` or ``çonv`` breaks them.

:func:`safe_names` renames such nodes, tensors and params of an IR graph to plain ASCII names
(``[A-Za-z0-9_.-]``, unsafe characters as ``_``, a ``_<n>`` suffix where that collides); an exporter renames the
graph once, before lowering, so every file of the export uses the same names, and records the mapping (original
-> safe) in its manifest under ``safe_names``. ``quant_layer`` (deployq's layer path, which ``deployq verify``
matches with the simulation) keeps the original name.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from deployq.exporters.ir.graph import Graph

#: longest name kept as is (ncnn reads names with %255s; room for a suffix)
MAX_LEN = 200
_SAFE = re.compile(r"[A-Za-z0-9_.\-]+")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.\-]")
#: attrs whose value is deployq's name of the layer, not the graph's (kept)
_KEEP_ATTRS = ("quant_layer",)


def is_safe(name: str) -> bool:
    """True for a name every engine format holds as is."""
    return len(name) <= MAX_LEN and _SAFE.fullmatch(name) is not None


def _safe(name: str) -> str:
    out = _UNSAFE_CHAR.sub("_", name) or "_"
    if len(out) > MAX_LEN:
        out = f"{out[:MAX_LEN - 9]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return out


def name_map(names: list[str]) -> dict[str, str]:
    """``{original: safe}`` for the unsafe names of ``names`` (deterministic: the same names give the same map);
    safe names are never taken by a renamed one."""
    taken = set(names)
    mapping: dict[str, str] = {}
    for n in names:
        if n in mapping or is_safe(n):
            continue
        base = cand = _safe(n)
        i = 1
        while cand in taken:
            cand, i = f"{base}_{i}", i + 1
        taken.add(cand)
        mapping[n] = cand
    return mapping


def _rename_attrs(attrs: dict[str, Any], m: dict[str, str]) -> dict[str, Any]:
    return {k: (m.get(v, v) if isinstance(v, str) and k not in _KEEP_ATTRS else v) for k, v in attrs.items()}


def safe_names(g: Graph) -> tuple[Graph, dict[str, str]]:
    """(``g`` with every node, tensor and param name the engines cannot hold renamed, ``{original: safe}``);
    ``g`` itself when every name is safe (an empty map)."""
    names = [g.input_name] + [x for n in g.nodes for x in (n.name, *n.outputs)] + list(g.params)
    names += [k for k in (*g.aliases, *g.aliases.values(), *g.quant) if k not in names]
    m = name_map(list(dict.fromkeys(names)))
    if not m:
        return g, {}
    r = g.copy()
    for n in r.nodes:
        n.name = m.get(n.name, n.name)
        n.inputs = [m.get(t, t) for t in n.inputs]
        n.outputs = [m.get(t, t) for t in n.outputs]
        n.params = {role: m.get(k, k) for role, k in n.params.items()}
        n.attrs = _rename_attrs(n.attrs, m)
    r.params = {m.get(k, k): v for k, v in g.params.items()}
    r.outputs = [m.get(t, t) for t in g.outputs]
    r.input_name = m.get(g.input_name, g.input_name)
    r.aliases = {m.get(k, k): m.get(v, v) for k, v in g.aliases.items()}
    r.quant = {m.get(k, k): v for k, v in g.quant.items()}
    return r, m
