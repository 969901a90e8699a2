"""``calibrate(net, data, method)`` -> ScaleFile, ``apply(qnet, scalefile)``, ``report(scalefile)``."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from .. import __version__
from ..data import class_balanced_subset
from ..profiles import Profile, load_profile
from ..progress import progress
from .base import CalibrationError, Calibrator, get_calibrator
from .collect import ActivationTap, trace
from .histogram import abs_histogram
from .scalefile import ScaleFile, ScaleFileError, TensorRange, quant_params


class CalibrationWarning(UserWarning):
    """A calibrated threshold that clips a lot (the MXNet-entropy failure mode)."""


def _core():
    """``(quant_layers, float_mode)`` from the deployq core, or None while it is not installed."""
    try:
        from deployq import float_mode, quant_layers  # type: ignore[attr-defined]
    except ImportError:
        return None
    return quant_layers, float_mode


def class_balanced_sampler(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` images of every class (the seed's ``--num-sample``), deterministic for a seed."""
    return class_balanced_subset(np.asarray(y), per_class, seed)


class StreamHash:
    """SHA-256 over the float32 bytes of every batch in order, then the total shape (see scalefile)."""

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


def iter_batches(data: Any, batch_size: int = 64, num_batches: int | None = None) -> Iterator[Any]:
    """Batches (NDArray or NumPy) from an array, a DataLoader or any iterable of batches / (x, y) pairs."""
    if isinstance(data, (np.ndarray, mx.nd.NDArray)):
        src: Iterable[Any] = (data[i:i + batch_size] for i in range(0, data.shape[0], batch_size))
    else:
        src = data
    for i, b in enumerate(src):
        if num_batches is not None and i >= num_batches:
            return
        if isinstance(b, (tuple, list)):
            b = b[0]
        yield b


def _num_batches(data: Any, batch_size: int, num_batches: int | None) -> int | None:
    if isinstance(data, (np.ndarray, mx.nd.NDArray)):
        n = -(-data.shape[0] // batch_size)
    else:
        try:
            n = len(data)
        except TypeError:
            n = None
    if num_batches is not None:
        return num_batches if n is None else min(n, num_batches)
    return n


def _layer_info(net, profile: Profile):
    """(paths of the layers to calibrate or None for every Conv/Dense, {path: block}, float-mode context)."""
    core = _core()
    if core is not None:
        quant_layers, float_mode = core
        q = quant_layers(net)
        if q:
            return list(q), q, float_mode(net)
    return None, {}, nullcontext()


def _ensure_initialized(net: gluon.Block, x: mx.nd.NDArray) -> None:
    try:
        for p in net.collect_params().values():
            p.data()
    except gluon.parameter.DeferredInitializationError:
        net(x)


def calibrate(net: gluon.HybridBlock, data: Any, method: str = "kl", profile: str | Profile = "ncnn",
              num_batches: int | None = None, quiet: bool = False, *, batch_size: int = 64,
              model_name: str | None = None, warn_clip_share: float = 1e-3, warn_threshold_ratio: float = 0.5,
              zero_threshold: float | None = None, **method_kwargs: Any) -> ScaleFile:
    """Calibrate the input range of every quantized Conv/Dense of ``net`` on ``data``.

    :param net: a plain fp32 Gluon HybridBlock (every Conv/Dense is a layer) or a deployq-quantized net
        (only ``deployq.quant_layers(net)``; activations come from its fp32 graph under ``float_mode``).
    :param data: a NumPy/NDArray array of images, a Gluon DataLoader or any re-iterable of batches or
        ``(x, y)`` pairs. Histogram methods (kl, percentile, mse) and EMA with ``passes > 1`` read it twice.
    :param method: a name in ``CALIBRATORS`` (minmax, ema, kl, percentile, mse); ``method_kwargs`` go to
        its class (``percentile=99.99``, ``momentum=0.9, passes=1``, ``num_bins=2048``).
    :param zero_threshold: a tensor that is zero on every calibration image has no range: by default that is
        an error; with a float, that threshold is used instead (and a warning is given).
    :param warn_clip_share: warn when a threshold clips more than this share of a tensor's values.
    :param warn_threshold_ratio: warn, on a signed tensor, when threshold < ratio * observed max and the
        clipped share exceeds ``warn_clip_share`` (the MXNet entropy failure).
    """
    prof = load_profile(profile)
    cls = get_calibrator(method)
    cls(prof.activation, **method_kwargs)  # bad kwargs fail before any work (TypeError names them)
    layers, qlayers, ctx = _layer_info(net, prof)

    it = iter_batches(data, batch_size, num_batches)
    try:
        first = next(it)
    except StopIteration:
        raise CalibrationError("no calibration data: the data source yielded no batches") from None
    first_nd = first if isinstance(first, mx.nd.NDArray) else mx.nd.array(np.asarray(first, dtype=np.float32))
    if first_nd.shape[0] == 0:
        raise CalibrationError("no calibration data: the first batch is empty")
    _ensure_initialized(net, first_nd)
    with ctx:
        tap = ActivationTap(net, layers)
    cals: dict[str, Calibrator] = {i: cls(prof.activation, **method_kwargs) for i in tap.internals}
    layer_of: dict[str, list[str]] = {}
    for p in tap.points:
        layer_of.setdefault(p.internal, []).append(p.layer)
    c0 = next(iter(cals.values()))
    passes = [("range", k) for k in range(c0.range_passes)] + ([("hist", 0)] if c0.uses_histogram else [])
    if len(passes) > 1 and iter(data) is data:
        raise CalibrationError(f"method {method!r} reads the data {len(passes)} times; pass a re-iterable "
                               "(array, list, DataLoader), not a one-shot iterator")
    nb = _num_batches(data, batch_size, num_batches)
    bar = progress(total=None if nb is None else nb * len(passes), desc=f"calibrate {method}", disable=quiet)
    hasher = StreamHash()
    absmax: dict[str, float] = {}
    for kind, k in passes:
        src = iter_batches(data, batch_size, num_batches) if (kind, k) != passes[0] else _chain(first, it)
        if kind == "hist":
            absmax = {i: c.absmax for i, c in cals.items()}
        for b in src:
            if kind == "range" and k == 0:
                hasher.update(b.asnumpy() if isinstance(b, mx.nd.NDArray) else np.asarray(b))
            x = b if isinstance(b, mx.nd.NDArray) else mx.nd.array(np.asarray(b, dtype=np.float32))
            outs = tap(x)
            for name, o in zip(tap.internals, outs, strict=False):
                a = o.asnumpy()
                if kind == "range":
                    lo, hi = float(a.min()), float(a.max())
                    if not (np.isfinite(lo) and np.isfinite(hi)):
                        bad = "NaN" if np.isnan(a).any() else "Inf"
                        raise CalibrationError(f"{bad} activations at the input of layer(s) "
                                               f"{', '.join(layer_of[name])}")
                    cals[name].update_range(lo, hi, a.size, k)
                else:
                    counts, zeros = abs_histogram(a, absmax[name], cals[name].num_bins)
                    cals[name].update_histogram(counts, zeros)
            bar.update(1)
    bar.close()
    if hasher.n == 0:
        raise CalibrationError("no calibration data: the data source yielded no images")

    data_hash = hasher.hexdigest()
    sf = ScaleFile(model_name or getattr(net, "name", type(net).__name__), tap.fingerprint, prof.name,
                   f"deployq {__version__} calibrate --method {method}")
    results = {}
    for name, cal in cals.items():
        if cal.absmax == 0:
            layers_here = ", ".join(layer_of[name])
            if zero_threshold is None:
                raise CalibrationError(f"the input of layer(s) {layers_here} is zero on every calibration image: "
                                       "no range to calibrate (pass zero_threshold=<float> to use a fixed one)")
            warnings.warn(f"layer(s) {layers_here}: constant-zero input, using zero_threshold={zero_threshold}",
                          CalibrationWarning, stacklevel=2)
            results[name] = (float(zero_threshold), -float(zero_threshold) if prof.activation.signed else 0.0,
                             float(zero_threshold), 0.0)
            continue
        r = cal.compute()
        if getattr(cal, "guarded", False):
            warnings.warn(f"layer(s) {', '.join(layer_of[name])}: the KL threshold clipped more than "
                          f"{cal.max_clipped_share:g} of the values; raised to {r.threshold:.4g} (clip guard; "
                          "max_clipped_share=None keeps ncnn2table's threshold)", CalibrationWarning, stacklevel=2)
        results[name] = (r.threshold, r.lo, r.hi, r.clipped_share)
    grid = prof.activation
    for p in tap.points:
        cal = cals[p.internal]
        t, lo, hi, share = results[p.internal]
        signed = bool(grid.signed or cal.signed_data)
        step, zp, conv = quant_params(t, lo, hi, grid.bits, grid.signed, grid.symmetric, grid.narrow_range)
        sf.tensors[p.key] = TensorRange(
            layer=p.layer, kind="input", tensor=p.tensor, method=method, threshold=t, lo=lo, hi=hi,
            bits=grid.bits, signed=signed, zero_point=zp, step=step, convention=conv, samples=hasher.n,
            data_hash=data_hash, observed_min=float(cal.min), observed_max=float(cal.max),
            clipped_share=share)
        blk = qlayers.get(p.layer)
        cfg = getattr(blk, "layer_config", None) if blk is not None else None
        sf.layers[p.layer] = {"quantized": True,
                              "weight_bits": int(_cfg(cfg, "weight_bits", prof.weight.bits)),
                              "weight_granularity": str(_cfg(cfg, "weight_granularity", prof.weight.granularity))}
    check(sf, warn_clip_share, warn_threshold_ratio)
    return sf


def _cfg(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def check(sf: ScaleFile, max_clip_share: float = 1e-3, threshold_ratio: float = 0.5) -> list[str]:
    """Guard rails: a warning (naming the layer) per tensor whose threshold clips more than ``max_clip_share``
    of its values, stressed when a signed tensor is cut below ``threshold_ratio`` of its observed max."""
    msgs = []
    for _key, r in sf.tensors.items():
        if r.clipped_share is None or r.clipped_share <= max_clip_share:
            continue
        amax = max(abs(r.observed_min), abs(r.observed_max))
        msg = (f"layer {r.layer}: {r.method} threshold {r.threshold:.4g} clips {100 * r.clipped_share:.3g}% of "
               f"its input values (observed |x| max {amax:.4g})")
        if r.observed_min < 0 and amax > 0 and r.threshold < threshold_ratio * amax:
            msg += (f"; a signed tensor cut below {threshold_ratio:g}x its max, as MXNet's entropy calibration "
                    "does when it loses accuracy; consider method='minmax' or 'percentile' for this layer")
        warnings.warn(msg, CalibrationWarning, stacklevel=3)
        msgs.append(msg)
    return msgs


def report(sf: ScaleFile) -> str:
    """A per-tensor table: threshold, observed max |x|, threshold/max, clipped share, step."""
    head = f"{'tensor':<32} {'method':<10} {'threshold':>10} {'max|x|':>10} {'T/max':>6} {'clipped':>9} {'step':>10}"
    lines = [f"model {sf.model_name} ({sf.fingerprint}), profile {sf.profile}", head, "-" * len(head)]
    for key, r in sf.tensors.items():
        amax = max(abs(r.observed_min), abs(r.observed_max))
        ratio = r.threshold / amax if amax > 0 else float("nan")
        share = "n/a" if r.clipped_share is None else f"{100 * r.clipped_share:.4f}%"
        lines.append(f"{key:<32} {r.method:<10} {r.threshold:>10.4g} {amax:>10.4g} {ratio:>6.3f} {share:>9} "
                     f"{r.step:>10.4g}")
    return "\n".join(lines)


def apply(qnet: gluon.Block, sf: ScaleFile) -> int:
    """Set the calibrated input ranges into a deployq-quantized net; returns the number of layers set.

    Raises ScaleFileError when the file was made for another model or lacks a quantized layer."""
    core = _core()
    if core is None:
        raise RuntimeError("apply() needs the deployq core (deployq.quantize / quant_layers), not installed")
    quant_layers, float_mode = core
    q = quant_layers(qnet)
    if not q:
        raise ValueError("apply(): the net has no quantized layers; call deployq.quantize(net) first")
    from ..naming import structure_fingerprint
    with float_mode(qnet):
        fp = structure_fingerprint(trace(qnet).tojson())
    if fp != sf.fingerprint:
        raise ScaleFileError(f"scale file was calibrated for a different model: file fingerprint {sf.fingerprint} "
                             f"({sf.model_name}), this model {fp}")
    missing = [p for p in q if f"{p}:input" not in sf.tensors]
    if missing:
        raise ScaleFileError(f"scale file has no input range for quantized layer(s): {', '.join(missing)}")
    for path, blk in q.items():
        r = sf.tensors[f"{path}:input"]
        blk.set_input_range(r.lo, r.hi)
    return len(q)
