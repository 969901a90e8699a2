"""The versioned JSON scale file every exporter reads (schema ``deployq.scales`` v1, docs/design.md).

One schema, one strict loader, one way to build entries:

- :class:`TensorRange` is one ``tensors`` entry; :data:`TENSOR_FIELDS` lists every field with its type, whether it
  may be ``null`` and whether it may be absent. :meth:`TensorRange.on_grid` builds an entry from a threshold /
  range and an integer grid (the one range -> (step, zero point) function, :func:`grid_params`).
- :class:`ScaleFile` is the whole file; :meth:`ScaleFile.to_json` is its only serialisation (sorted keys, indent 2,
  no NaN), so every writer produces the same bytes for the same content; :meth:`ScaleFile.save` writes it
  atomically (temporary name in the same folder, then ``os.replace``).
- :func:`load` / :meth:`ScaleFile.from_dict` validate schema, version, required fields, types, unknown fields and,
  when asked, the model fingerprint; errors are :class:`ScaleFileError` naming the file, the entry and the field.

Conventions: ``threshold`` T is the clipping threshold in float units. ``step`` is the float value of one
integer code (MXNet/ONNX/Tengine ``scale``): symmetric grids ``step = T / qmax``, zero_point 0; asymmetric
(ONNX uint8) ``step = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / step)``. ncnn's table
stores the *multiplier* ``1 / step = qmax / T``; ``convention`` says so in words.

Fields that can be unknown are ``null`` (writers always write them; a reader accepts them absent):
``samples`` (images behind the range: unknown for a range tracked during QAT), ``data_hash`` (a streamed SHA-256
over the float32 bytes of the calibration images in the order seen, then their total shape, :class:`StreamHash`;
it does not depend on the batch size), ``observed_min``/``observed_max`` (the range seen before clipping) and
``clipped_share`` (share of values beyond the threshold).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_scale_values
from ..errors import InputError

SCHEMA = "deployq.scales"
VERSION = 1
STEP_CONVENTION = "step = threshold / qmax (int -> float); ncnn multiplier = 1 / step"
ASYM_CONVENTION = "step = (hi - lo) / (qmax - qmin), x = step * (q - zero_point)"
KINDS = ("input", "activation")


class ScaleFileError(InputError, ValueError):
    """An unreadable, unknown-version, incomplete or wrong-model scale file."""


# field -> (JSON type, nullable, may be absent)
_NUM, _INT, _STR, _BOOL, _OBJ = "number", "integer", "string", "boolean", "object"
TENSOR_FIELDS: dict[str, tuple[str, bool, bool]] = {
    "layer": (_STR, True, False),        # consumer (kind input) / producer (activation); null: the graph input
    "kind": (_STR, False, False),        # "input" (<layer>:input) or "activation" (any tensor, Tengine)
    "tensor": (_STR, False, False),      # structural / IR tensor name ("data" for the graph input)
    "method": (_STR, False, False),      # minmax, ema, kl, percentile, mse, tracked, calibration-minmax, ...
    "threshold": (_NUM, False, False),
    "lo": (_NUM, False, False),
    "hi": (_NUM, False, False),
    "bits": (_INT, False, False),
    "signed": (_BOOL, False, False),     # the integer grid: int (True) or uint (False)
    "symmetric": (_BOOL, False, False),  # symmetric grid (zero_point 0) or affine (ONNX uint8)
    "zero_point": (_INT, False, False),
    "step": (_NUM, False, False),
    "convention": (_STR, False, False),
    "samples": (_INT, True, True),
    "data_hash": (_STR, True, True),
    "observed_min": (_NUM, True, True),
    "observed_max": (_NUM, True, True),
    "clipped_share": (_NUM, True, True),
}
LAYER_FIELDS: dict[str, tuple[str, bool, bool]] = {
    "quantized": (_BOOL, False, False),
    "weight_bits": (_INT, True, True),
    "weight_granularity": (_STR, True, True),
    "input_quantized": (_BOOL, False, True),
    "fake_bn": (_STR, True, True),       # the BatchNorm folded into the layer during training
    "weight_step": ("number list", False, True),  # per-output-channel weight steps (Tengine)
}


def _type_ok(kind: str, v: Any) -> bool:
    if kind == _NUM:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == _INT:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == _STR:
        return isinstance(v, str)
    if kind == _BOOL:
        return isinstance(v, bool)
    if kind == _OBJ:
        return isinstance(v, dict)
    return isinstance(v, list) and all(_type_ok(_NUM, x) for x in v)


def _check_fields(d: Any, spec: dict[str, tuple[str, bool, bool]], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ScaleFileError(f"{where}: must be a JSON object, got {type(d).__name__}")
    missing = [n for n, (_, _, optional) in spec.items() if not optional and n not in d]
    if missing:
        raise ScaleFileError(f"{where}: missing fields {', '.join(missing)}")
    unknown = sorted(set(d) - set(spec))
    if unknown:
        raise ScaleFileError(f"{where}: unknown fields {', '.join(unknown)} (schema {SCHEMA} v{VERSION} has: "
                             f"{', '.join(spec)})")
    for n, (kind, nullable, _) in spec.items():
        if n not in d:
            continue
        v = d[n]
        if v is None:
            if not nullable:
                raise ScaleFileError(f"{where}: field {n!r} may not be null")
        elif not _type_ok(kind, v):
            raise ScaleFileError(f"{where}: field {n!r} must be a{'n' if kind[0] in 'aeiou' else ''} {kind}"
                                 f"{' (finite)' if kind == _NUM else ''}{' or null' if nullable else ''}, got {v!r}")
    return d


def grid_params(threshold: float, lo: float, hi: float, grid: Any) -> tuple[float, int, str]:
    """(step, zero_point, convention) of a range on an integer grid (anything with ``bits``, ``signed``,
    ``symmetric``, ``qmin``, ``qmax``, e.g. :class:`deployq.profiles.TensorGrid`). A zero range gives step 0."""
    if grid.symmetric:
        return (float(threshold) / grid.qmax if threshold > 0 else 0.0), 0, STEP_CONVENTION
    lo0, hi0 = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi0 - lo0 <= 0:
        return 0.0, 0, ASYM_CONVENTION
    step = (hi0 - lo0) / (grid.qmax - grid.qmin)
    zp = int(np.clip(np.round(grid.qmin - lo0 / step), grid.qmin, grid.qmax))
    return step, zp, ASYM_CONVENTION


def quant_params(threshold: float, lo: float, hi: float, bits: int, signed: bool, symmetric: bool,
                 narrow_range: bool) -> tuple[float, int, str]:
    """:func:`grid_params` for a grid given by its fields (kept for callers that have no TensorGrid)."""
    from ..profiles import TensorGrid

    return grid_params(threshold, lo, hi, TensorGrid(bits=bits, signed=signed, symmetric=symmetric,
                                                     narrow_range=narrow_range))


@dataclass
class TensorRange:
    """One calibrated tensor (``tensors["<layer>:input"]`` or, for Tengine, ``tensors["<tensor>"]``)."""

    layer: str | None
    kind: str
    tensor: str
    method: str
    threshold: float
    lo: float
    hi: float
    bits: int
    signed: bool
    symmetric: bool
    zero_point: int
    step: float
    convention: str
    samples: int | None = None
    data_hash: str | None = None
    observed_min: float | None = None
    observed_max: float | None = None
    clipped_share: float | None = None

    @property
    def multiplier(self) -> float:
        """ncnn's scale: ``1 / step`` (``qmax / threshold``); 0 for a zero step."""
        return 0.0 if self.step == 0 else 1.0 / self.step

    @property
    def observed_absmax(self) -> float | None:
        """``max(|observed_min|, |observed_max|)``, None while either is unknown."""
        if self.observed_min is None or self.observed_max is None:
            return None
        return max(abs(self.observed_min), abs(self.observed_max))

    @classmethod
    def on_grid(cls, layer: str | None, kind: str, tensor: str, method: str, threshold: float, lo: float,
                hi: float, grid: Any, **provenance: Any) -> TensorRange:
        """An entry for a range on ``grid`` (step, zero point and convention from :func:`grid_params`);
        ``provenance``: samples, data_hash, observed_min, observed_max, clipped_share (default null)."""
        step, zp, conv = grid_params(threshold, lo, hi, grid)
        r = cls(layer=layer, kind=kind, tensor=tensor, method=method, threshold=float(threshold), lo=float(lo),
                hi=float(hi), bits=int(grid.bits), signed=bool(grid.signed), symmetric=bool(grid.symmetric),
                zero_point=zp, step=float(step), convention=conv, **provenance)
        r.validate()
        return r

    def to_dict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in TENSOR_FIELDS}

    def validate(self, where: str = "tensor") -> TensorRange:
        """Check types and values (raises ScaleFileError naming ``where`` and the field)."""
        d = _check_fields(self.to_dict(), TENSOR_FIELDS, where)
        if d["kind"] not in KINDS:
            raise ScaleFileError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {d['kind']!r}")
        for n in ("threshold", "step"):
            if d[n] < 0:
                raise ScaleFileError(f"{where}: field {n!r} must be >= 0, got {d[n]!r}")
        if not 1 <= d["bits"] <= 32:
            raise ScaleFileError(f"{where}: field 'bits' must be in 1..32, got {d['bits']!r}")
        if d["samples"] is not None and d["samples"] < 0:
            raise ScaleFileError(f"{where}: field 'samples' must be >= 0 or null, got {d['samples']!r}")
        if d["clipped_share"] is not None and not 0.0 <= d["clipped_share"] <= 1.0:
            raise ScaleFileError(f"{where}: field 'clipped_share' must be in [0, 1] or null, got "
                                 f"{d['clipped_share']!r}")
        return self

    @classmethod
    def from_dict(cls, key: str, d: dict[str, Any], source: str = "scale file") -> TensorRange:
        where = f"{source}: tensor {key!r}"
        _check_fields(d, TENSOR_FIELDS, where)
        names = [f.name for f in fields(cls)]
        return cls(**{n: d[n] for n in names if n in d}).validate(where)


class StreamHash:
    """SHA-256 over the float32 bytes of every batch in order, then the total shape (the ``data_hash``)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.n = 0
        self.item_shape: tuple[int, ...] | None = None

    def update(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._h.update(memoryview(x).cast("B"))
        self.n += x.shape[0]
        self.item_shape = tuple(x.shape[1:])

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(str((self.n,) + (self.item_shape or ())).encode())
        return "sha256:" + h.hexdigest()[:16]


@dataclass
class ScaleFile:
    model_name: str
    fingerprint: str
    profile: str
    producer: str
    tensors: dict[str, TensorRange] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the input shape and preprocessing of the calibration images (deployq.preprocess.Preprocess.to_dict)
    preprocess: dict[str, Any] | None = None
    #: guard-rail messages of the calibration that made this file (not written to the file)
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "version": VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "profile": self.profile, "producer": self.producer,
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
            "layers": {k: dict(v) for k, v in self.layers.items()},
            **({"preprocess": dict(self.preprocess)} if self.preprocess else {}),
        }

    def to_json(self) -> str:
        """The file's text: sorted keys, indent 2, no NaN, trailing newline (same content -> same bytes)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def validate(self) -> ScaleFile:
        """Check every entry (what :func:`load` checks); returns self."""
        ScaleFile.from_dict(self.to_dict(), source="scale file")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], expect_fingerprint: str | None = None, source: str = "scale file"):
        if not isinstance(d, dict) or "schema" not in d or "version" not in d:
            raise ScaleFileError(f"{source}: not a deployq scale file (no 'schema'/'version')")
        if d["schema"] != SCHEMA:
            raise ScaleFileError(f"{source}: unknown schema {d['schema']!r} (expected {SCHEMA!r})")
        if d["version"] != VERSION:
            raise ScaleFileError(f"{source}: unsupported {SCHEMA} version {d['version']!r}; "
                                 f"this deployq reads version {VERSION}")
        _check_fields(d, _TOP_FIELDS, source)
        model = _check_fields(d["model"], {"name": (_STR, False, False), "fingerprint": (_STR, False, False)},
                              f"{source}: field 'model'")
        if expect_fingerprint is not None and model["fingerprint"] != expect_fingerprint:
            raise ScaleFileError(f"{source} was calibrated for a different model: file fingerprint "
                                 f"{model['fingerprint']} ({model['name']}), this model {expect_fingerprint}")
        tensors = {k: TensorRange.from_dict(k, v, source) for k, v in d["tensors"].items()}
        layers = {k: dict(_check_fields(v, LAYER_FIELDS, f"{source}: layer {k!r}"))
                  for k, v in d.get("layers", {}).items()}
        pre = d.get("preprocess")
        if pre is not None:
            from ..preprocess import Preprocess

            Preprocess.from_dict(pre, f"{source}: field 'preprocess'")  # checked here, used by the CLIs
        return cls(model["name"], model["fingerprint"], d["profile"], d["producer"], tensors, layers, pre)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` atomically (temporary file in the same folder, then rename)."""
        return write_atomic(path, self.to_json())


# top-level fields
_TOP_FIELDS: dict[str, tuple[str, bool, bool]] = {
    "schema": (_STR, False, False), "version": (_INT, False, False), "model": (_OBJ, False, False),
    "profile": (_STR, False, False), "producer": (_STR, False, False), "tensors": (_OBJ, False, False),
    "layers": (_OBJ, False, True), "preprocess": (_OBJ, True, True),
}


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | os.PathLike, expect_fingerprint: str | None = None) -> ScaleFile:
    """Read and validate a scale file (schema, fields, then the values: :func:`deployq.checks.check_scale_values`);
    ``expect_fingerprint`` rejects a file made for another model."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ScaleFileError(f"{path}: cannot read the scale file ({e.strerror or e})") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScaleFileError(f"{path}: not valid JSON ({e})") from e
    sf = ScaleFile.from_dict(d, expect_fingerprint, source=str(path))
    check_scale_values(sf.tensors, str(path))  # thresholds > 0, plausible, steps that fit float32; not empty
    return sf
