"""config_list: which layers are quantized and how (NNI-style, validated).

A config list is an ordered list of dicts. A dict matches a layer when its ``op_types`` (if given) contains the
layer type (``Conv2D``, ``Dense``; ``default`` = both) **and** its ``op_names`` (exact structural names such as
``features.0``) or ``op_names_re`` (regular expressions, full match) contain the layer's name (if given). A dict
with neither key matches every layer. The **last matching dict wins whole** (keys are not merged); if it has
``exclude: True`` the layer stays fp32.

Keys: ``op_types``, ``op_names``, ``op_names_re``, ``exclude``, ``quant_types`` (subset of weight/input/output),
``quant_bits`` (int or ``{type: int}``), ``quant_dtype`` (``int``/``uint`` or per type), ``quant_scheme``
(``per_tensor_symmetric``, ``per_group_symmetric``, ``per_channel_symmetric``, ``per_tensor_affine``; or per
type), ``quant_start_step``, ``input_mode`` (``offline``: tracked range; ``online``: the current batch's range),
``fake_bn`` (fold a following BatchNorm during training; default: the profile's ``fold_bn``), ``bn_freeze_step``
(fake BN: the running statistics follow the batch statistics for this many training steps, then stay frozen, as
Jacob et al. 2018 recommend; ``0``: frozen from the start, and the batch statistics are not computed at all;
default ``None``: never frozen).

A profile with ``quantize_outputs: non_layer_consumers`` (``onnx``) adds an output grid to the layers that
``deployq.quantize`` finds by topology (see ``deployq.api.output_points``), on the grid ``quant_types``
``output`` would give (the entry's ``quant_bits``/``quant_dtype``/``quant_scheme`` for ``output`` apply).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .errors import InputError, MissingInputError
from .profiles import Profile, TensorGrid

LAYER_TYPES = ("Conv2D", "Dense")
QUANT_TYPES = ("weight", "input", "output")
SCHEMES = {
    "per_tensor_symmetric": ("layer", True),
    "per_group_symmetric": ("group", True),
    "per_channel_symmetric": ("channel", True),
    "per_tensor_affine": ("layer", False),
}
KEYS = {"op_types", "op_names", "op_names_re", "exclude", "quant_types", "quant_bits", "quant_dtype",
        "quant_scheme", "quant_start_step", "input_mode", "fake_bn", "bn_freeze_step"}


class ConfigError(InputError, ValueError):
    """A config list that cannot be applied (the message names the entry and the problem)."""


@dataclass(frozen=True)
class LayerConfig:
    """The resolved quantization of one layer (what ``deployq.describe`` prints)."""

    name: str
    op_type: str
    weight: TensorGrid | None
    input: TensorGrid | None
    output: TensorGrid | None
    input_mode: str = "offline"
    quant_start_step: int = 0
    fake_bn: bool = False
    #: fake BN: training steps during which the running statistics follow the batch statistics (None: always)
    bn_freeze_step: int | None = None
    entry: int = -1
    #: the output quantization point lies after the ReLU that follows the layer (through a folded BatchNorm):
    #: the layer applies that ReLU itself before quantizing its output (the ReLU block then changes nothing)
    output_relu: bool = False
    #: the layer's input is a ReLU block's output that only quantized layers read: the layer applies that ReLU
    #: itself, fused into its input quantizer (the ReLU block is the identity while the net is quantized)
    input_relu: bool = False

    @property
    def quantized(self) -> bool:
        return any(g is not None for g in (self.weight, self.input, self.output))


def _per_type(value: Any, qtype: str, default: Any, key: str, i: int) -> Any:
    if isinstance(value, dict):
        bad = set(value) - set(QUANT_TYPES)
        if bad:
            raise ConfigError(f"config_list[{i}].{key}: unknown quant type(s) {sorted(bad)}; use {QUANT_TYPES}")
        return value.get(qtype, default)
    return default if value is None else value


def validate(config_list: list[dict[str, Any]], profile: Profile) -> None:
    """Check keys and values; raise ConfigError naming the entry."""
    if not isinstance(config_list, list) or not all(isinstance(d, dict) for d in config_list):
        raise ConfigError("config_list must be a list of dicts")
    for i, d in enumerate(config_list):
        unknown = set(d) - KEYS
        if unknown:
            raise ConfigError(f"config_list[{i}]: unknown key(s) {sorted(unknown)}; supported keys: {sorted(KEYS)}")
        for t in d.get("op_types", []):
            if t not in LAYER_TYPES + ("default",):
                raise ConfigError(f"config_list[{i}].op_types: {t!r} is not supported; use {LAYER_TYPES} or 'default'")
        for t in d.get("quant_types", []):
            if t not in QUANT_TYPES:
                raise ConfigError(f"config_list[{i}].quant_types: {t!r} is not one of {QUANT_TYPES}")
        for p in d.get("op_names_re", []):
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"config_list[{i}].op_names_re: bad regular expression {p!r}: {e}") from e
        for qt in QUANT_TYPES:
            bits = _per_type(d.get("quant_bits"), qt, 8, "quant_bits", i)
            if not isinstance(bits, int) or not 2 <= bits <= profile.max_bits:
                raise ConfigError(f"config_list[{i}].quant_bits: {bits!r} for {qt} is not supported by profile "
                                  f"{profile.name!r} (integers 2..{profile.max_bits})")
            dtype = _per_type(d.get("quant_dtype"), qt, "int", "quant_dtype", i)
            if dtype not in ("int", "uint"):
                raise ConfigError(f"config_list[{i}].quant_dtype: {dtype!r}; use 'int' or 'uint'")
            if dtype == "uint" and qt != "weight" and not profile.activation.allow_unsigned:
                raise ConfigError(f"config_list[{i}]: profile {profile.name!r} computes signed symmetric int8 "
                                  f"activations only (quant_dtype 'uint' is not supported); use profile='custom'")
            if dtype == "uint" and qt == "weight":
                raise ConfigError(f"config_list[{i}]: weights are always signed; quant_dtype 'uint' applies to "
                                  f"input/output only")
            scheme = _per_type(d.get("quant_scheme"), qt, None, "quant_scheme", i)
            if scheme is not None and scheme not in SCHEMES:
                raise ConfigError(f"config_list[{i}].quant_scheme: {scheme!r}; supported: {sorted(SCHEMES)}")
        if d.get("input_mode", "offline") not in ("offline", "online"):
            raise ConfigError(f"config_list[{i}].input_mode must be 'offline' or 'online'")
        qs = d.get("quant_start_step", 0)
        if not isinstance(qs, int) or qs < 0:
            raise ConfigError(f"config_list[{i}].quant_start_step must be a non-negative integer")
        fs = d.get("bn_freeze_step")
        if fs is not None and (not isinstance(fs, int) or isinstance(fs, bool) or fs < 0):
            raise ConfigError(f"config_list[{i}].bn_freeze_step must be a non-negative integer or None, "
                              f"got {fs!r}")


def _matches(d: dict[str, Any], name: str, op_type: str) -> bool:
    types = d.get("op_types")
    if types is not None and op_type not in types and "default" not in types:
        return False
    names, regs = d.get("op_names"), d.get("op_names_re")
    if names is None and regs is None:
        return True
    return name in (names or []) or any(re.fullmatch(p, name) for p in (regs or []))


def _grid(d: dict[str, Any], qt: str, base: TensorGrid, i: int, depthwise: bool, grouped: bool = False
          ) -> TensorGrid:
    bits = _per_type(d.get("quant_bits"), qt, base.bits, "quant_bits", i)
    signed = _per_type(d.get("quant_dtype"), qt, "int" if base.signed else "uint", "quant_dtype", i) == "int"
    scheme = _per_type(d.get("quant_scheme"), qt, None, "quant_scheme", i)
    gran, sym = base.granularity, base.symmetric if signed == base.signed else signed
    if qt == "weight" and scheme is None and (depthwise or grouped):
        gran = base.depthwise_granularity if depthwise else base.grouped_granularity
    if scheme is not None:
        gran, sym = SCHEMES[scheme]
    if qt != "weight":
        gran = "layer"
    return replace(base, bits=bits, signed=signed, symmetric=sym, granularity=gran)


def resolve(config_list: list[dict[str, Any]] | None, layers: dict[str, tuple[str, bool] | tuple[str, bool, bool]],
            profile: Profile, auto_outputs: dict[str, bool] | None = None) -> dict[str, LayerConfig]:
    """Resolve the config for every layer. ``layers`` maps structural name -> (op type, is depthwise[, is grouped:
    a conv with ``1 < groups < channels``]).

    ``auto_outputs`` (layer -> whether the point is after the following ReLU): layers that get an output grid
    without asking for it, when their input and weights are quantized and their entry has no ``output``."""
    if config_list is None:
        config_list = [{"op_types": list(LAYER_TYPES), "quant_types": ["weight", "input"]}]
    validate(config_list, profile)
    for i, d in enumerate(config_list):
        for n in d.get("op_names", []):
            if n not in layers:
                raise ConfigError(f"config_list[{i}].op_names: {n!r} matches no Conv2D/Dense layer; layers are: "
                                  f"{', '.join(layers) or '(none)'}")
        for p in d.get("op_names_re", []):
            if not any(re.fullmatch(p, n) for n in layers):
                raise ConfigError(f"config_list[{i}].op_names_re: {p!r} matches no Conv2D/Dense layer")
    out: dict[str, LayerConfig] = {}
    for name, (op_type, depthwise, *more) in layers.items():
        grouped = bool(more and more[0])
        idx = [i for i, d in enumerate(config_list) if _matches(d, name, op_type)]
        if not idx or config_list[idx[-1]].get("exclude", False):
            out[name] = LayerConfig(name, op_type, None, None, None, entry=idx[-1] if idx else -1)
            continue
        i = idx[-1]
        d = config_list[i]
        qtypes = d.get("quant_types", ["weight", "input"])
        out[name] = LayerConfig(
            name=name, op_type=op_type,
            weight=_grid(d, "weight", profile.weight, i, depthwise, grouped) if "weight" in qtypes else None,
            input=_grid(d, "input", profile.activation, i, depthwise) if "input" in qtypes else None,
            output=_grid(d, "output", profile.activation, i, depthwise) if "output" in qtypes else None,
            input_mode=d.get("input_mode", "offline"),
            quant_start_step=d.get("quant_start_step", 0),
            fake_bn=d.get("fake_bn", profile.fold_bn),
            bn_freeze_step=d.get("bn_freeze_step"),
            entry=i,
        )
        c = out[name]
        if (auto_outputs and name in auto_outputs and c.output is None and c.input is not None
                and c.weight is not None):
            out[name] = replace(c, output=_grid(d, "output", profile.activation, i, depthwise),
                                output_relu=bool(auto_outputs[name]))
    return out


def load_config_list(path: str) -> list:
    """A config list from a JSON file (``--config`` of every command); InputError naming the file."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads(Path(path).read_text())
    except OSError as e:
        raise MissingInputError(f"cannot read the --config file ({e.strerror or e})", where=path) from None
    except ValueError as e:
        raise InputError(f"--config: not valid JSON ({e})", where=path) from None
    if not isinstance(cfg, list):
        raise InputError(f"--config: a deployq config list is a JSON list of dicts, got {type(cfg).__name__}",
                         where=path)
    return cfg
