"""Stable structural names for Gluon blocks and MXNet symbol nodes.

Gluon 1.x names blocks with a global counter (``mobilenet0_conv0``, ``mobilenet1_conv0`` ...) that changes with
every ``get_model`` call. deployq names a block by its path in the block tree instead (``features.0``,
``features.2.0.body.1``), the same path ``save_parameters`` uses, and renames symbol nodes accordingly, so scale
files, config lists, ncnn tables and error messages agree across processes.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from mxnet import gluon


def block_paths(net: gluon.Block) -> OrderedDict[str, gluon.Block]:
    """All blocks of ``net`` by structural path (the root is ``""``), in registration order."""
    out: OrderedDict[str, gluon.Block] = OrderedDict()

    def walk(block: gluon.Block, path: str) -> None:
        out[path] = block
        for key, child in block._children.items():
            walk(child, f"{path}.{key}" if path else key)

    walk(net, "")
    return out


def prefix_map(net: gluon.Block) -> dict[str, str]:
    """Gluon name prefix (``mobilenet0_conv0_``) -> structural path (``features.0``)."""
    return {blk.prefix: path for path, blk in block_paths(net).items() if blk.prefix}


def node_path(node_name: str, prefixes: dict[str, str]) -> str:
    """Structural name of a symbol node, e.g. ``mobilenet0_conv0_fwd`` -> ``features.0`` and
    ``cifarresnetv10_stage1__plus0`` -> ``features.1.0._plus0``. Unknown names are returned unchanged."""
    best = ""
    for p in prefixes:
        if node_name.startswith(p) and len(p) > len(best):
            best = p
    if not best:
        return node_name
    path, rest = prefixes[best], node_name[len(best):]
    if rest.endswith("_fwd"):
        rest = rest[: -len("_fwd")]
    if rest in ("", "fwd"):
        return path or node_name
    return f"{path}.{rest}" if path else rest


def structure_fingerprint(symbol_json: str) -> str:
    """Fingerprint of a network's structure from its symbol JSON: the sequence of weighted ops with their
    shape attributes, independent of node names (so a Gluon net and its json/params export agree)."""
    keys = ("num_filter", "kernel", "num_group", "stride", "num_hidden")
    items = []
    for n in json.loads(symbol_json)["nodes"]:
        if n["op"] in ("Convolution", "FullyConnected"):
            attrs = n.get("attrs", n.get("attr", {})) or {}
            items.append([n["op"]] + [str(attrs.get(k, "")) for k in keys])
    return "sha256:" + hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
