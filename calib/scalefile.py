"""The versioned JSON scale file every exporter reads (schema ``deployq.scales`` v1, docs/design.md).

``TensorRange`` is one ``tensors`` entry (fields whitelisted, types checked on load); ``ScaleFile`` the whole
file. ``save`` writes atomically (temporary name in the same folder, then ``os.replace``); ``load`` validates the
schema, version, required fields and, when asked, the model fingerprint.

Conventions: ``threshold`` T is the clipping threshold in float units. ``step`` is the float value of one
integer code (MXNet/ONNX/Tengine ``scale``): symmetric grids ``step = T / qmax``, zero_point 0; asymmetric
(ONNX uint8) ``step = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / step)``. ncnn's table
stores the *multiplier* ``1 / step = qmax / T``; ``convention`` says so in words.

``data_hash`` is a streamed SHA-256 over the float32 bytes of the calibration images in the order seen, then
their total shape (``stream_hash``); it does not depend on the batch size.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA = "deployq.scales"
VERSION = 1
STEP_CONVENTION = "step = threshold / qmax (int -> float); ncnn multiplier = 1 / step"
ASYM_CONVENTION = "step = (hi - lo) / (qmax - qmin), x = step * (q - zero_point)"


class ScaleFileError(ValueError):
    """An unreadable, unknown-version, incomplete or wrong-model scale file."""


@dataclass
class TensorRange:
    """One calibrated tensor (``tensors["<layer>:input"]``)."""

    layer: str
    kind: str
    tensor: str
    method: str
    threshold: float
    lo: float
    hi: float
    bits: int
    signed: bool
    zero_point: int
    step: float
    convention: str
    samples: int
    data_hash: str
    observed_min: float
    observed_max: float
    clipped_share: float | None = None

    @property
    def multiplier(self) -> float:
        """ncnn's scale: ``1 / step`` (``qmax / threshold``); 0 for a zero step."""
        return 0.0 if self.step == 0 else 1.0 / self.step

    @classmethod
    def from_dict(cls, key: str, d: dict[str, Any]) -> TensorRange:
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.name != "clipped_share"]
        missing = [n for n in required if n not in d]
        if missing:
            raise ScaleFileError(f"tensor {key!r}: missing fields {', '.join(missing)}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ScaleFileError(f"tensor {key!r}: unknown fields {', '.join(unknown)}")
        try:
            return cls(**{n: d[n] for n in names if n in d})
        except TypeError as e:  # pragma: no cover - dataclass arity
            raise ScaleFileError(f"tensor {key!r}: {e}") from e


def quant_params(threshold: float, lo: float, hi: float, bits: int, signed: bool, symmetric: bool,
                 narrow_range: bool) -> tuple[float, int, str]:
    """(step, zero_point, convention) of a range on a grid; the one range -> (scale, zero point) function."""
    if signed or symmetric:
        qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        return (threshold / qmax if threshold > 0 else 0.0), 0, STEP_CONVENTION
    qmin, qmax = 0, 2 ** bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return 0.0, 0, ASYM_CONVENTION
    step = (hi - lo) / (qmax - qmin)
    zp = int(qmin - round(lo / step))
    return step, min(max(zp, qmin), qmax), ASYM_CONVENTION


@dataclass
class ScaleFile:
    model_name: str
    fingerprint: str
    profile: str
    producer: str
    tensors: dict[str, TensorRange] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "version": VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "profile": self.profile, "producer": self.producer,
            "tensors": {k: asdict(v) for k, v in self.tensors.items()},
            "layers": self.layers,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], expect_fingerprint: str | None = None, source: str = "scale file"):
        if not isinstance(d, dict) or "schema" not in d or "version" not in d:
            raise ScaleFileError(f"{source}: not a deployq scale file (no 'schema'/'version')")
        if d["schema"] != SCHEMA:
            raise ScaleFileError(f"{source}: unknown schema {d['schema']!r} (expected {SCHEMA!r})")
        if d["version"] != VERSION:
            raise ScaleFileError(f"{source}: unsupported {SCHEMA} version {d['version']!r}; "
                                 f"this deployq reads version {VERSION}")
        missing = [k for k in ("model", "profile", "producer", "tensors") if k not in d]
        if missing:
            raise ScaleFileError(f"{source}: missing fields {', '.join(missing)}")
        model = d["model"]
        missing = [k for k in ("name", "fingerprint") if k not in model]
        if missing:
            raise ScaleFileError(f"{source}: missing fields {', '.join('model.' + m for m in missing)}")
        if expect_fingerprint is not None and model["fingerprint"] != expect_fingerprint:
            raise ScaleFileError(f"{source} was calibrated for a different model: file fingerprint "
                                 f"{model['fingerprint']} ({model['name']}), this model {expect_fingerprint}")
        tensors = {k: TensorRange.from_dict(k, v) for k, v in d["tensors"].items()}
        return cls(model["name"], model["fingerprint"], d["profile"], d["producer"], tensors, d.get("layers", {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2, allow_nan=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path


def load(path: str | os.PathLike, expect_fingerprint: str | None = None) -> ScaleFile:
    """Read and validate a scale file; ``expect_fingerprint`` rejects a file made for another model."""
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ScaleFileError(f"{path}: not valid JSON ({e})") from e
    return ScaleFile.from_dict(d, expect_fingerprint, source=str(path))
