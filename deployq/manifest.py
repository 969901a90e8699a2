"""``deployq-export.json``: the manifest every exporter writes next to its files (docs/design.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "deployq-export.json"
SCHEMA, VERSION = "deployq.export", 1
ENGINES = ("onnxruntime", "ncnn", "tengine", "mxnet")


def manifest_bytes(engine: str, model: str, input_shape: tuple[int, ...], files: dict[str, str],
                   layers: dict[str, str], producer: str, **extra: Any) -> bytes:
    """The manifest's bytes (sorted keys: byte-identical re-runs), for exporters that write all files at once."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    doc = {"schema": SCHEMA, "version": VERSION, "engine": engine, "model": model,
           "input": {"name": "data", "shape": list(input_shape), "dtype": "float32"},
           "files": files, "layers": layers, "producer": producer, **extra}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write_manifest(out_dir: str | os.PathLike, engine: str, model: str, input_shape: tuple[int, ...],
                   files: dict[str, str], layers: dict[str, str], producer: str, **extra: Any) -> Path:
    """Write ``out_dir/deployq-export.json`` atomically (sorted keys: byte-identical re-runs)."""
    data = manifest_bytes(engine, model, input_shape, files, layers, producer, **extra)
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export directory, checked; file entries are resolved to absolute paths."""
    d = Path(export_dir)
    path = d / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{d}: no {MANIFEST} (not a deployq export directory)")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if doc.get("schema") != SCHEMA or doc.get("version") != VERSION:
        raise ValueError(f"{path}: unknown schema/version {doc.get('schema')!r}/{doc.get('version')!r}; "
                         f"expected {SCHEMA!r}/{VERSION}")
    for key in ("engine", "files", "input"):
        if key not in doc:
            raise ValueError(f"{path}: missing key {key!r}")
    doc["paths"] = {k: d / v for k, v in doc["files"].items()}
    for k, p in doc["paths"].items():
        if k != "qnet" and not p.exists():
            raise FileNotFoundError(f"{path}: file {k!r} -> {p} does not exist")
    return doc
