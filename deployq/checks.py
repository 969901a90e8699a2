"""Bad-number checks of the input layer: the values a file may hold by its schema but no engine can run honestly.

Each check raises :class:`deployq.errors.InputError` (exit 3) or :class:`deployq.errors.UsageError` (exit 2)
naming the file and the layer / tensor, with the fix:

- :func:`check_batchnorm`: a BatchNorm ``moving_var`` that is negative or not finite (the folded multiplier would
  be NaN or 0) -- every IR front end calls it;
- :func:`check_tensor_range`, :func:`check_scale_values`: a scale file's thresholds and steps: > 0, finite, within
  ``PLAUSIBLE_RATIO`` x the observed range and ``MAX_THRESHOLD``, a step whose reciprocal (ncnn's multiplier) fits
  float32; a file with no tensors -- the strict loader (``deployq.calib.scalefile.load``) calls it;
- :func:`fp32_layers`: which Conv/FC layers a scale file leaves in fp32 (none covered: refused);
- :func:`check_input_shape`: an ``N,C,H,W`` that is positive, at most ``MAX_SIDE`` per side and ``MAX_ELEMENTS``
  values in all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import InputError, UsageError

#: a threshold above this many times the largest |value| observed in calibration is a typo or a corrupt file
PLAUSIBLE_RATIO = 1e6
#: thresholds (float units) outside [MIN_THRESHOLD, MAX_THRESHOLD]: no CNN activation needs them on an int grid
MIN_THRESHOLD, MAX_THRESHOLD = 1e-20, 1e6
#: --input-shape limits: pixels per side, and values in one input tensor (1 GiB of float32)
MAX_SIDE, MAX_ELEMENTS = 8192, 1 << 28
_F32 = np.finfo(np.float32)
#: a trained moving_var this close below 0 is float drift, not a corrupt model
NEGATIVE_VAR_TOLERANCE = 1e-7


def check_batchnorm(var: np.ndarray, eps: float, layer: str, where: str) -> None:
    """Refuse a BatchNorm whose ``moving_var`` (``var``) is negative or not finite, or whose ``var + eps`` is not
    positive; ``layer`` is the BatchNorm's name, ``where`` the model / params file."""
    var = np.asarray(var, np.float64).reshape(-1)
    # tiny negatives (-1e-12) are float drift of trained running variances: harmless once eps is added
    bad = ~np.isfinite(var) | (var < -NEGATIVE_VAR_TOLERANCE) | ~(var + float(eps) > 0)
    if bad.any():
        c = int(np.argmax(bad))
        what = "not finite" if not np.isfinite(var[c]) else "negative" if var[c] < 0 else f"<= -eps ({eps:g})"
        raise InputError(f"BatchNorm layer {layer!r}: moving_var is {what} ({var[c]:g} at channel {c}, "
                         f"{int(bad.sum())} of {var.size} channels); a variance must be finite and >= 0",
                         where=where, fix="fix or re-train the model: its folded scale would be NaN or 0")


def check_graph_batchnorm(g: Any, where: str) -> None:
    """:func:`check_batchnorm` for every BatchNorm node of an IR graph (``g.param(node, 'moving_var')``)."""
    for node in g.nodes:
        if node.op == "BatchNorm":
            check_batchnorm(g.param(node, "moving_var"), node.attrs.get("eps", 1e-5), node.name, where)


def check_net_batchnorm(net: Any, where: str) -> None:
    """:func:`check_batchnorm` for every ``running_var`` / ``moving_var`` parameter of a Gluon net (None: no-op)."""
    if net is None:
        return
    for name, p in net.collect_params().items():
        for suffix in ("running_var", "moving_var"):
            if name.endswith(suffix) and p._data is not None:
                check_batchnorm(p.data().asnumpy(), 0.0, name[:-len(suffix)].rstrip("_.") or name, where)


def check_tensor_range(key: str, threshold: float, step: float, observed_absmax: float | None,
                       where: str) -> None:
    """Refuse a scale-file entry ``key`` whose threshold is not a plausible positive number or whose step (and
    its reciprocal, ncnn's multiplier) does not fit float32."""
    def refuse(msg: str, fix: str) -> None:
        raise InputError(f"tensor {key!r}: {msg}", where=where, fix=fix)

    recal = "re-run deployq calibrate for this model"
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)) or threshold <= 0:
        refuse(f"threshold {threshold!r} is not a positive finite number (a zero or negative range cannot be "
               "put on an integer grid)", recal)
    if threshold < MIN_THRESHOLD or threshold > MAX_THRESHOLD:
        refuse(f"threshold {threshold:g} is implausible (outside [{MIN_THRESHOLD:g}, {MAX_THRESHOLD:g}])", recal)
    if observed_absmax is not None and observed_absmax > 0 and threshold > PLAUSIBLE_RATIO * observed_absmax:
        refuse(f"threshold {threshold:g} is implausible: over {PLAUSIBLE_RATIO:g} x the observed max |value| "
               f"{observed_absmax:g}", recal)
    if not (math.isfinite(step) and _F32.tiny <= step <= _F32.max and 1.0 / step <= _F32.max):
        refuse(f"step {step!r} does not fit float32 (its reciprocal is the engine's multiplier)", recal)


def check_scale_values(tensors: Mapping[str, Any], source: str) -> None:
    """Every :class:`~deployq.calib.scalefile.TensorRange` of a scale file (``tensors``: key -> entry) through
    :func:`check_tensor_range`; a file with no tensors is refused."""
    if not tensors:
        raise InputError("the scale file holds no tensors: nothing would be quantized", where=source,
                         fix="calibrate the model with deployq calibrate --data DIR")
    for key, r in tensors.items():
        check_tensor_range(key, r.threshold, r.step, r.observed_absmax, source)
        if r.lo > r.hi:
            raise InputError(f"tensor {key!r}: lo {r.lo:g} is above hi {r.hi:g}", where=source,
                             fix="re-run deployq calibrate for this model")


class Fp32LayersWarning(UserWarning):
    """An export keeps some Conv/FC layers in fp32 because the scale file does not cover them."""


def fp32_layers(layers: Iterable[str], covered: Iterable[str], where: str) -> list[str]:
    """The ``layers`` (a model's Conv/FC layers, in order) missing from ``covered`` (those the scale file
    quantizes): they stay fp32. None covered at all: an InputError (the export would not be int8)."""
    layers, covered = list(layers), set(covered)
    left = [k for k in layers if k not in covered]
    if layers and len(left) == len(layers):
        raise InputError(f"the scale file covers none of the model's {len(layers)} Conv/FC layers "
                         f"({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''})", where=where,
                         fix="calibrate this model (deployq calibrate) and pass its scale file")
    return left


def check_input_shape(shape: tuple[int, ...], flag: str = "--input-shape") -> tuple[int, ...]:
    """``shape`` if it is N,C,H,W of positive integers, each side at most :data:`MAX_SIDE` and at most
    :data:`MAX_ELEMENTS` values in all; else a UsageError naming ``flag``."""
    shape = tuple(int(v) for v in shape)
    text = ",".join(map(str, shape))
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"{flag} must be N,C,H,W (four positive integers), got {text}")
    if max(shape[2:]) > MAX_SIDE:
        raise UsageError(f"{flag} {text}: a side above {MAX_SIDE} pixels", fix=f"give H and W of at most {MAX_SIDE}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise UsageError(f"{flag} {text}: {math.prod(shape):,} values in one input (at most {MAX_ELEMENTS:,}, "
                         "1 GiB of float32)", fix="use a smaller batch N or image size")
    return shape
