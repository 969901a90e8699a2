"""``deployq-export.json``: the manifest every exporter writes next to its files (docs/design.md)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST = "deployq-export.json"
SCHEMA, VERSION = "deployq.export", 1
ENGINES = ("onnxruntime", "ncnn", "tengine", "mxnet")


def sha256_bytes(contents: dict[str, bytes]) -> dict[str, str]:
    """``{file name: SHA-256 hex digest}`` of files given as ``{file name: bytes}``."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(contents.items())}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_folder(folder: str | os.PathLike) -> dict[str, str]:
    """``{file name: SHA-256 hex digest}`` of every plain file directly in ``folder`` except the manifest."""
    return {p.name: _file_sha256(p) for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST}


def manifest_bytes(engine: str, model: str, input_shape: tuple[int, ...], files: dict[str, str],
                   layers: dict[str, str], producer: str, sha256: dict[str, str] | None = None,
                   **extra: Any) -> bytes:
    """The manifest's bytes (sorted keys: byte-identical re-runs), for exporters that write all files at once.
    ``sha256``: ``{file name: hex digest}`` of every file of the export (:func:`sha256_bytes`,
    :func:`sha256_folder`); :func:`read_manifest` checks them."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {ENGINES}")
    doc = {"schema": SCHEMA, "version": VERSION, "engine": engine, "model": model,
           "input": {"name": "data", "shape": list(input_shape), "dtype": "float32"},
           "files": files, "layers": layers, "producer": producer, **extra}
    if sha256 is not None:
        doc["sha256"] = dict(sorted(sha256.items()))
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write_manifest(out_dir: str | os.PathLike, engine: str, model: str, input_shape: tuple[int, ...],
                   files: dict[str, str], layers: dict[str, str], producer: str, **extra: Any) -> Path:
    """Write ``out_dir/deployq-export.json`` atomically (sorted keys: byte-identical re-runs). Without a
    ``sha256`` argument, the digests of the files now in ``out_dir`` are recorded."""
    extra.setdefault("sha256", sha256_folder(out_dir))
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
        from .errors import MissingInputError

        raise MissingInputError(f"no {MANIFEST} (not a deployq export directory)", where=d)
    from .errors import InputError, MissingInputError

    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", where=path, fix="export again into this folder") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("version") != VERSION:
        got = (doc.get("schema"), doc.get("version")) if isinstance(doc, dict) else (type(doc).__name__, None)
        raise InputError(f"unknown schema/version {got[0]!r}/{got[1]!r}; expected {SCHEMA!r}/{VERSION}",
                         where=path)
    for key in ("engine", "files", "input"):
        if key not in doc:
            raise InputError(f"missing key {key!r}", where=path)
    if not isinstance(doc["files"], dict) or not all(isinstance(v, str) for v in doc["files"].values()):
        raise InputError("field 'files' must map keys to file names", where=path)
    doc["paths"] = {k: d / v for k, v in doc["files"].items()}
    for k, p in doc["paths"].items():
        if k != "qnet" and not p.exists():
            raise MissingInputError(f"file {k!r} -> {p} does not exist", where=path,
                                    fix="export again into this folder")
    check_sha256(d, doc.get("sha256"))
    return doc


def check_sha256(export_dir: Path, digests: dict[str, str] | None) -> None:
    """Every file of the manifest's ``sha256`` exists in ``export_dir`` with that digest, else an
    :class:`~deployq.errors.InputError` naming the file (exports written before the digests are not checked)."""
    from .errors import InputError

    if digests is None:
        return
    where = export_dir / MANIFEST
    if not isinstance(digests, dict):
        raise InputError("field 'sha256' must map file names to SHA-256 digests", where=where)
    for name, want in sorted(digests.items()):
        if Path(name).name != name or name in ("", ".", ".."):
            raise InputError(f"field 'sha256' names {name!r}, not a file of the export folder", where=where)
        p = export_dir / name
        if not p.is_file():
            raise InputError(f"export is not whole: {name} is missing", where=export_dir,
                             fix="export again into this folder")
        if _file_sha256(p) != want:
            raise InputError(f"export is not whole: {name} changed after export (its SHA-256 differs from "
                             f"{MANIFEST})", where=p, fix="export again into this folder")
