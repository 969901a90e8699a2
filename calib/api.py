"""``calibrate(net, data, method)`` -> ScaleFile, ``apply(qnet, scalefile)``, ``report(scalefile)``."""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from .. import __version__
from ..data import class_balanced_subset
from ..profiles import Profile, TensorGrid, load_profile
from ..progress import progress
from .base import DEFAULT_METHOD, CalibrationError, Calibrator, get_calibrator, pow2_range
from .collect import ActivationTap, trace
from .histogram import abs_histogram
from .scalefile import ScaleFile, ScaleFileError, StreamHash, TensorRange
from .totals import PassTotals

__all__ = ["CalibrationWarning", "StreamHash", "apply", "calibrate", "check", "class_balanced_sampler",
           "iter_batches", "report"]

#: guard-rail defaults: warn when a threshold clips more than this share of a tensor's values ...
WARN_CLIP_SHARE = 1e-3
#: ... or when, on a signed tensor, the threshold is below this fraction of the observed max |x|
WARN_THRESHOLD_RATIO = 0.5


class CalibrationWarning(UserWarning):
    """A calibrated threshold that clips a lot or sits far below the data (the MXNet-entropy failure mode)."""


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


class _DLPack:
    """Adapter for ``np.from_dlpack`` around an MXNet DLPack capsule (CPU)."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, stream=None):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)


def host_view(a: mx.nd.NDArray) -> np.ndarray | None:
    """A read-only NumPy view of a CPU NDArray without copying (DLPack), valid until ``a`` is written again;
    None where MXNet cannot give one (oneDNN-layout arrays, other devices)."""
    if a.context.device_type != "cpu":
        return None
    try:
        return np.from_dlpack(_DLPack(a.to_dlpack_for_read()))
    except (AttributeError, TypeError, RuntimeError, BufferError, mx.base.MXNetError):
        return None


class HostReader:
    """The tapped tensors of a batch as NumPy, without per-batch allocations: a zero-copy view where MXNet
    gives one (checked once per tensor against a copy), else a copy into a buffer kept per tensor (MXNet's
    oneDNN layouts are reordered by the copy). A result is valid until the next call for the same tensor."""

    def __init__(self) -> None:
        self.view_ok: dict[str, bool] = {}
        self.buffers: dict[str, np.ndarray] = {}

    def __call__(self, name: str, a: mx.nd.NDArray) -> np.ndarray:
        ok = self.view_ok.get(name)
        if ok is None:
            v = host_view(a)
            ok = self.view_ok[name] = v is not None and bool(np.array_equal(v, a.asnumpy(), equal_nan=True))
        if ok:
            v = host_view(a)
            if v is not None:
                return v
        buf = self.buffers.get(name)
        if buf is None or buf.shape != a.shape:
            buf = self.buffers[name] = np.empty(a.shape, dtype=np.float32)
        if a.dtype != np.float32:
            buf[...] = a.asnumpy()
            return buf
        mx.base.check_call(mx.base._LIB.MXNDArraySyncCopyToCPU(a.handle, buf.ctypes.data_as(ctypes.c_void_p),
                                                               ctypes.c_size_t(buf.size)))
        return buf


def _layer_grids(net, prof: Profile):
    """(paths of the layers to calibrate or None for every Conv/Dense, {path: block}, {path: input grid},
    float-mode context). A quantized net: its layers with a quantized input, each on its own input grid."""
    core = _core()
    if core is not None:
        quant_layers, float_mode = core
        q = quant_layers(net)
        if q:
            grids = {p: b.layer_config.input for p, b in q.items() if b.layer_config.input is not None}
            if not grids:
                raise CalibrationError("the quantized net has no layer with a quantized input: nothing to calibrate")
            return list(grids), q, grids, float_mode(net)
    return None, {}, {}, nullcontext()


def _ensure_initialized(net: gluon.Block, x: mx.nd.NDArray) -> list[gluon.Parameter]:
    """Finish deferred initialisation (one forward) if needed; returns the net's parameters (a walk of the block
    tree's registered parameters: ``collect_params`` costs tens of ms per call on a small net)."""
    from ..naming import block_paths

    params = list({id(p): p for b in block_paths(net).values() for p in getattr(b, "_reg_params", {}).values()}
                  .values()) or list(net.collect_params().values())
    try:
        for p in params:
            p.data()
    except gluon.parameter.DeferredInitializationError:
        net(x)
    return params


#: the last ActivationTap built: (weak reference to the net, key, tap); one entry, so at most one tap's buffers
_TAP_CACHE: list = []


_PLAIN = (bool, int, float, str, type(None))


def _structure_key(net: gluon.Block) -> tuple:
    """What the traced fp32 graph depends on besides the parameters, without tracing it (a trace costs several ms
    per call): every block's path, identity and type, its ``_kwargs`` (Conv/Pool/BatchNorm arguments) and its
    plain attributes (an Activation's type, a Dense's units ...). A block replaced or reconfigured changes it."""
    from ..naming import block_paths

    return tuple((path, id(b), type(b).__qualname__, repr(getattr(b, "_kwargs", None)),
                  tuple(sorted((k, v) for k, v in vars(b).items() if isinstance(v, _PLAIN))))
                 for path, b in block_paths(net).items())


def _tap(net: gluon.HybridBlock, layers: list[str] | None, params: list[gluon.Parameter], fuse: bool = True
         ) -> ActivationTap:
    """The tap of ``net``, reused while the net, its block structure (``_structure_key``), the layers and its
    Parameter objects are the same (calibrating one net with several methods builds and warms up the graph once;
    the tap holds the Parameters, so their ids are not reused while it lives)."""
    import weakref

    key = (_structure_key(net), None if layers is None else tuple(layers), tuple(id(p) for p in params), fuse)
    if _TAP_CACHE:
        ref, k, tap = _TAP_CACHE[0]
        if ref() is net and k == key:
            return tap
    tap = ActivationTap(net, layers, fuse=fuse)
    _TAP_CACHE[:] = [(weakref.ref(net), key, tap)]
    return tap


def _to_nd(b: Any, ctx: mx.Context | None = None) -> mx.nd.NDArray:
    """A batch as an NDArray on ``ctx`` (the net's: a DataLoader with workers yields ``cpu_shared`` arrays, which
    MXNet's graphs refuse beside ``cpu`` parameters)."""
    if not isinstance(b, mx.nd.NDArray):
        return mx.nd.array(np.asarray(b, dtype=np.float32), ctx=ctx or mx.cpu())
    return b if ctx is None or b.context == ctx else b.as_in_context(ctx)


class BatchInput:
    """NumPy batches as NDArrays on the net's context without an allocation per batch: one array per batch shape,
    overwritten by the next batch of that shape (the caller has finished with the previous one: calibrate() waits
    for every batch). NDArray batches are passed through (moved to ``ctx`` where needed)."""

    def __init__(self, ctx: mx.Context | None) -> None:
        self.ctx = ctx or mx.cpu()
        self.arrays: dict[tuple[int, ...], mx.nd.NDArray] = {}

    def __call__(self, b: Any) -> mx.nd.NDArray:
        if isinstance(b, mx.nd.NDArray):
            return _to_nd(b, self.ctx)
        a = np.ascontiguousarray(b, dtype=np.float32)
        nd = self.arrays.get(a.shape)
        if nd is None:
            nd = self.arrays[a.shape] = mx.nd.empty(a.shape, ctx=self.ctx, dtype=np.float32)
        mx.base.check_call(mx.base._LIB.MXNDArraySyncCopyFromCPU(nd.handle, a.ctypes.data_as(ctypes.c_void_p),
                                                                 ctypes.c_size_t(a.size)))
        return nd


def calibrate(net: gluon.HybridBlock, data: Any, method: str = DEFAULT_METHOD, profile: str | Profile = "ncnn",
              num_batches: int | None = None, quiet: bool = False, *, batch_size: int = 64,
              model_name: str | None = None, warn_clip_share: float = WARN_CLIP_SHARE,
              warn_threshold_ratio: float = WARN_THRESHOLD_RATIO, zero_threshold: float | None = None,
              fuse: bool = True, **method_kwargs: Any) -> ScaleFile:
    """Calibrate the input range of every quantized Conv/Dense of ``net`` on ``data``.

    :param net: a plain fp32 Gluon HybridBlock (every Conv/Dense is a layer, on the profile's activation
        grid) or a deployq-quantized net (the layers of ``deployq.quant_layers(net)`` whose input is quantized,
        each on its own input grid; activations come from its fp32 graph under ``float_mode``).
    :param data: a NumPy/NDArray array of images, a Gluon DataLoader or any re-iterable of batches or
        ``(x, y)`` pairs. kl (ncnn's histogram over the whole set's range) and EMA with ``passes > 1`` read it
        more than once; minmax, ema, percentile and mse once.
    :param method: a name in ``CALIBRATORS`` (minmax, ema, kl, percentile, mse, aciq, eq); ``method_kwargs`` go to
        its class (``percentile=99.99``, ``momentum=0.9, passes=1``, ``num_bins`` (kl 2048; percentile/mse
        4096, a power of two),
        ``max_clipped_share=1e-3`` (KL clip guard, None = off)).
    :param zero_threshold: a tensor that is zero on every calibration image has no range: by default that is
        an error; with a float, that threshold is used instead (and a warning is given).
    :param fuse: read the activations from the oneDNN-fused graph (Conv + BN + ReLU (+ add) as one operator, BN
        folded into the weights as ncnn runs it; up to 1.9x faster per pass). Its tensors differ from the plain
        graph's by float rounding (checked on the first batch: within 1e-4 of each tensor's max |x|, else the
        plain graph is used and a warning says so). False: the plain graph.
    :param warn_clip_share: warn when a threshold clips more than this share of a tensor's values.
    :param warn_threshold_ratio: warn when, on a signed tensor, threshold < ratio * observed max |x| (the MXNet
        entropy failure), whatever the clipped share.

    Every warning is given as a :class:`CalibrationWarning` and also kept, as one line, in the returned
    file's ``warnings`` list (not written to the file; the CLI prints them).
    """
    prof = load_profile(profile)
    cls = get_calibrator(method)
    cls(prof.activation, **method_kwargs)  # bad kwargs fail before any work (TypeError names them)
    layers, qlayers, grids, ctx = _layer_grids(net, prof)

    it = iter_batches(data, batch_size, num_batches)
    try:
        first = next(it)
    except StopIteration:
        raise CalibrationError("no calibration data: the data source yielded no batches") from None
    first_nd = _to_nd(first)
    if first_nd.context.device_type in ("cpu_shared", "cpu_pinned"):  # (DataLoader workers / pin_memory)
        first_nd = first_nd.as_in_context(mx.cpu())
    if first_nd.shape[0] == 0:
        raise CalibrationError("no calibration data: the first batch is empty")
    params = _ensure_initialized(net, first_nd)
    net_ctx = params[0].list_ctx()[0] if params else None
    with ctx:
        # oneDNN's fused operators run on the CPU only
        tap = _tap(net, layers, params, fuse and (net_ctx is None or net_ctx.device_type == "cpu"))
        tap.check_fusion(_to_nd(first_nd, net_ctx))
    tap.begin()
    # one calibrator per (tensor, grid): a tensor read by layers on different grids is calibrated per grid
    key_of = {p.key: (p.internal, grids.get(p.layer, prof.activation)) for p in tap.points}
    cals: dict[tuple[str, TensorGrid], Calibrator] = {}
    layer_of: dict[tuple[str, TensorGrid], list[str]] = {}
    for p in tap.points:
        k = key_of[p.key]
        if k not in cals:
            cals[k] = cls(k[1], **method_kwargs)
        layer_of.setdefault(k, []).append(p.layer)
    by_internal: dict[str, list[tuple[tuple[str, TensorGrid], Calibrator]]] = {i: [] for i in tap.internals}
    for k, c in cals.items():
        by_internal[k[0]].append((k, c))
    c0 = next(iter(cals.values()))
    if c0.one_pass_histogram:  # range and histogram in one pass (percentile, mse)
        passes = [("pow2", 0)]
    else:
        passes = [("range", k) for k in range(c0.range_passes)] + ([("hist", 0)] if c0.uses_histogram else [])
    if len(passes) > 1 and iter(data) is data:
        raise CalibrationError(f"method {method!r} reads the data {len(passes)} times; pass a re-iterable "
                               "(array, list, DataLoader), not a one-shot iterator")
    nb = _num_batches(data, batch_size, num_batches)
    bar = progress(total=None if nb is None else nb * len(passes), desc=f"calibrate {method}", disable=quiet)
    to_input = BatchInput(net_ctx)
    hasher = StreamHash()  # in this thread: a hashing thread beside the engine's OpenMP threads slows both
    native = _use_native()
    read = HostReader()
    work: dict = {}  # histogram scratch buffers
    first_cal = {name: cs[0][1] for name, cs in by_internal.items()}  # calibrators of a tensor see the same data
    for kind, k in passes:
        src = _chain(first, it) if (kind, k) == passes[0] else iter_batches(data, batch_size, num_batches)
        totals = None
        if native:
            mode = kind if kind in ("hist", "pow2") else (
                "clip" if c0.observe_mode == "clip" and k == c0.range_passes - 1 else "range")
            width = ActivationTap.STATS_LAYOUT[mode][0](c0.num_bins)
            aux = None
            if mode == "hist":
                aux = np.array([first_cal[n].absmax for n in tap.internals], dtype=np.float64)
            # order-independent methods add the batches up over all tensors at once (fed at the end of the pass)
            totals = PassTotals(len(tap.internals), mode, c0.num_bins, aux) if c0.order_independent else None
        for b in src:
            x = to_input(b)
            hash_batch = None
            if (kind, k) == passes[0]:
                hash_batch = lambda b=b: hasher.update(b.asnumpy() if isinstance(b, mx.nd.NDArray) else np.asarray(b))
            if totals is not None:  # (native) the hash runs while the engine computes the batch
                tap.accumulate(x, mode, c0.num_bins, totals, meanwhile=hash_batch)
                bad = totals.bad_tensor()
                if bad is not None:
                    lo_hi = (totals.lo[bad], totals.hi[bad])
                    _bad_activations("NaN" if np.isnan(lo_hi).any() else "Inf", tap, tap.internals[bad])
                bar.update(1)
                continue
            if hash_batch is not None:
                hash_batch()
            if native:
                if mode == "clip":
                    aux = np.array([first_cal[n].state_row() for n in tap.internals], dtype=np.float64).ravel()
                elif mode == "pow2":
                    aux = np.array([first_cal[n].pow2_hist_range for n in tap.internals], dtype=np.float64)
                stats = tap.batch_stats(x, mode, c0.num_bins, aux)
                _apply_stats(stats, tap.sizes(x.shape), tap, by_internal, mode, width, c0.num_bins, k)
                bar.update(1)
                continue
            outs = tap(x)
            for name, o in zip(tap.internals, outs, strict=True):
                a = read(name, o)  # read before the next forward overwrites it
                if kind in ("range", "pow2"):
                    lo, hi = float(a.min()), float(a.max())
                    if not (np.isfinite(lo) and np.isfinite(hi)):
                        _bad_activations("NaN" if np.isnan(a).any() else "Inf", tap, name)
                    for _, cal in by_internal[name]:
                        cal.update_range(lo, hi, a.size, k)
                        cal.observe(a, k)
                    if kind == "pow2":
                        r = pow2_range(max(abs(lo), abs(hi)), first_cal[name].pow2_hist_range)
                        counts, zeros = abs_histogram(a, r, c0.num_bins, work) if r > 0 else (
                            np.zeros(c0.num_bins, dtype=np.int64), a.size)
                        for _, cal in by_internal[name]:
                            cal.update_pow2_histogram(counts, zeros, r)
                else:
                    for _, cal in by_internal[name]:
                        counts, zeros = abs_histogram(a, cal.absmax, cal.num_bins, work)
                        cal.update_histogram(counts, zeros)
                del a
            bar.update(1)
        if totals is not None:
            totals.flush([[cal for _, cal in by_internal[n]] for n in tap.internals], k)
    bar.close()
    tap.end()  # the tapped tensors' buffers are not kept between calibrations
    if hasher.n == 0:
        raise CalibrationError("no calibration data: the data source yielded no images")

    data_hash = hasher.hexdigest()
    sf = ScaleFile(model_name or getattr(net, "name", type(net).__name__), tap.fingerprint, prof.name,
                   f"deployq {__version__} calibrate --method {method}")
    notes: list[str] = []
    results = {}
    for c in cals.values():
        c.images = hasher.n
    computed = _compute_all([c for c in cals.values() if c.absmax != 0])
    for key, cal in cals.items():
        layers_here = ", ".join(layer_of[key])
        if cal.absmax == 0:
            if zero_threshold is None:
                raise CalibrationError(f"the input of layer(s) {layers_here} is zero on every calibration image: "
                                       "no range to calibrate (pass zero_threshold=<float> to use a fixed one)")
            notes.append(f"layer(s) {layers_here}: constant-zero input, using zero_threshold={zero_threshold}")
            z = float(zero_threshold)
            results[key] = (z, -z if key[1].signed else 0.0, z, 0.0)
            continue
        r = computed[id(cal)]
        if getattr(cal, "guarded", False):
            notes.append(f"layer(s) {layers_here}: the KL threshold clipped more than {cal.max_clipped_share:g} "
                         f"of the values; raised to {r.threshold:.4g} (clip guard; max_clipped_share=None keeps "
                         "ncnn2table's threshold)")
        results[key] = (r.threshold, r.lo, r.hi, r.clipped_share)
    for p in tap.points:
        key = key_of[p.key]
        cal = cals[key]
        t, lo, hi, share = results[key]
        sf.tensors[p.key] = TensorRange.on_grid(
            p.layer, "input", p.tensor, method, t, lo, hi, key[1], samples=hasher.n, data_hash=data_hash,
            observed_min=float(cal.min), observed_max=float(cal.max),
            clipped_share=None if share is None else float(share))
        sf.layers[p.layer] = _layer_entry(qlayers.get(p.layer), prof)
    refine = getattr(c0, "refine", None)  # a method that searches beyond one tensor (EasyQuant: calib/eq.py)
    if refine is not None:
        refine(net, data, sf, {p.layer: key_of[p.key][1] for p in tap.points}, prof, batch_size)
    for msg in notes:
        warnings.warn(msg, CalibrationWarning, stacklevel=2)
    notes += check(sf, warn_clip_share, warn_threshold_ratio)
    sf.warnings = notes
    return sf


def _compute_all(cals: list[Calibrator]) -> dict[int, Any]:
    """``{id(cal): cal.compute()}``; methods with a costly search (``parallel_compute``: KL, outside the GIL) in
    two threads (elsewhere a pool costs more than it saves): each calibrator computes alone on its own state, so
    the results are the same as in a loop."""
    if len(cals) < 4 or not cals[0].parallel_compute:
        return {id(c): c.compute() for c in cals}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as ex:
        return {id(c): r for c, r in zip(cals, ex.map(lambda c: c.compute(), cals), strict=True)}


def _apply_stats(stats: np.ndarray, sizes: list[int], tap: ActivationTap, by_internal: dict, mode: str, width: int,
                 num_bins: int, k: int) -> None:
    """Feed one batch's ``dq_calib_stats`` vector (``width`` values per tapped tensor, in ``tap.internals``
    order) to the calibrators: min/max (and clipped counts in ``clip`` mode) or histogram counts + zeros."""
    for i, name in enumerate(tap.internals):
        row = stats[i * width:(i + 1) * width]
        cals = [cal for _, cal in by_internal[name]]
        if mode == "hist":  # [counts, zeros]
            for cal in cals:
                cal.update_histogram(row[:num_bins], int(row[num_bins]))  # exact integers in float64
            continue
        lo, hi = float(row[0]), float(row[1])  # range, clip: [lo, hi(, clipped)]; pow2: [lo, hi, R, counts, zeros]
        if not (np.isfinite(lo) and np.isfinite(hi)):
            _bad_activations("NaN" if np.isnan(lo) else "Inf", tap, name)
        for cal in cals:
            cal.update_range(lo, hi, sizes[i], k)
            if mode == "clip":
                cal.observe_clipped(int(row[2]), sizes[i], k)
            elif mode == "pow2":
                cal.update_pow2_histogram(row[3:3 + num_bins], int(row[3 + num_bins]), float(row[2]))


def _bad_activations(bad: str, tap: ActivationTap, name: str) -> None:
    layers_here = sorted({p.layer for p in tap.points if p.internal == name})
    raise CalibrationError(f"{bad} activations at the input of layer(s) {', '.join(layers_here)}")


#: False: always read the tapped tensors on the host (NumPy); None: the fused operator where it is available
NATIVE: bool | None = None


def _use_native() -> bool:
    """Whether calibrate() reduces the activations in the graph with ``dq_calib_stats`` (deployq.native.calibops,
    built at install); otherwise they are read on the host and reduced in NumPy, with the same results."""
    if NATIVE is False:
        return False
    from ..native import calibops

    return calibops.available()


def _layer_entry(blk: Any, prof: Profile) -> dict[str, Any]:
    """The scale file's ``layers`` entry of a quantized block (the profile's weight grid for a plain layer)."""
    if blk is not None and hasattr(blk, "layer_config"):
        from ..api import scale_layer_entry

        return scale_layer_entry(blk)
    return {"quantized": True, "weight_bits": int(prof.weight.bits), "weight_granularity": str(prof.weight.granularity)}


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def check(sf: ScaleFile, max_clip_share: float = WARN_CLIP_SHARE, threshold_ratio: float = WARN_THRESHOLD_RATIO
          ) -> list[str]:
    """Guard rails; returns one line per flagged tensor (each also given as a :class:`CalibrationWarning`).

    A tensor is flagged, naming its layer, when its threshold clips more than ``max_clip_share`` of its values,
    or when it is signed (observed min < 0) and its threshold is below ``threshold_ratio`` x its observed max
    |x| (MXNet's entropy failure: a signed tensor cut far below its range), even if few values are clipped.
    Tensors whose clipped share or observed range is unknown (null) are checked on what is known."""
    msgs = []
    for key, r in sf.tensors.items():
        amax = r.observed_absmax
        clips = r.clipped_share is not None and r.clipped_share > max_clip_share
        low = (amax is not None and amax > 0 and r.observed_min is not None and r.observed_min < 0
               and r.threshold < threshold_ratio * amax)
        if not (clips or low):
            continue
        share = "an unknown share" if r.clipped_share is None else f"{100 * r.clipped_share:.3g}%"
        msg = (f"layer {r.layer or key}: {r.method} threshold {r.threshold:.4g} clips {share} of its input values "
               f"(observed |x| max {'unknown' if amax is None else f'{amax:.4g}'})")
        if low:
            msg += (f"; a signed tensor cut below {threshold_ratio:g}x its max (T/max {r.threshold / amax:.3f}), as "
                    "MXNet's entropy calibration does when it loses accuracy; consider method='minmax' or "
                    "'percentile' for this layer")
        warnings.warn(msg, CalibrationWarning, stacklevel=3)
        msgs.append(msg)
    return msgs


def report(sf: ScaleFile) -> str:
    """A per-tensor table: threshold, observed max |x|, threshold/max, clipped share, step."""
    head = f"{'tensor':<32} {'method':<10} {'threshold':>10} {'max|x|':>10} {'T/max':>6} {'clipped':>9} {'step':>10}"
    lines = [f"model {sf.model_name} ({sf.fingerprint}), profile {sf.profile}", head, "-" * len(head)]
    for key, r in sf.tensors.items():
        amax = r.observed_absmax
        ratio = f"{r.threshold / amax:>6.3f}" if amax else f"{'n/a':>6}"
        amax_s = f"{amax:>10.4g}" if amax is not None else f"{'n/a':>10}"
        share = "n/a" if r.clipped_share is None else f"{100 * r.clipped_share:.4f}%"
        lines.append(f"{key:<32} {r.method:<10} {r.threshold:>10.4g} {amax_s} {ratio} {share:>9} {r.step:>10.4g}")
    return "\n".join(lines)


def apply(qnet: gluon.Block, sf: ScaleFile) -> int:
    """Set the calibrated input ranges into a deployq-quantized net; returns the number of layers set.

    The net remembers where each range came from (method, samples, data hash, observed range, clipped share;
    kept by ``deployq.save``/``load``) so that ``deployq.export_scales`` writes it while the range is unchanged.
    Raises ScaleFileError when the file was made for another model or lacks a layer with a quantized input."""
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
    todo = {p: b for p, b in q.items() if b.layer_config.input is not None}
    missing = [p for p in todo if f"{p}:input" not in sf.tensors]
    if missing:
        raise ScaleFileError(f"scale file has no input range for quantized layer(s): {', '.join(missing)}")
    info = getattr(qnet, "_deployq", None)
    record = info.setdefault("calibration", {}) if isinstance(info, dict) else {}
    for path, blk in todo.items():
        r = sf.tensors[f"{path}:input"]
        blk.set_input_range(r.lo, r.hi)
        record[path] = {"range": list(blk.input_range()), "method": r.method, "samples": r.samples,
                        "data_hash": r.data_hash, "observed_min": r.observed_min, "observed_max": r.observed_max,
                        "clipped_share": r.clipped_share}
    return len(todo)
