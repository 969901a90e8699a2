"""Simulated quantization study (the seed's ``simulate_quantization.py``): quantize a built-in fp32 model with
one set of options, calibrate its input ranges, and report fp32 vs simulated int top-1 on MNIST-5k test.

``simulate(SimOptions(...))`` runs one configuration; ``sweep(model)`` runs a grid and returns table rows
(``format_table`` prints them with the seed's columns).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon

from . import api
from .data import Split, batches, class_balanced_subset, load_mnist5k
from .naming import block_paths
from .profiles import load_profile
from .progress import progress
from .zoo import BUILTIN_MODELS, evaluate, get_trained, seed_everything

QUANT_TYPE_SCHEMES = {"layer": "per_tensor_symmetric", "group": "per_group_symmetric",
                      "channel": "per_channel_symmetric"}
#: Calibration methods handled here; others (kl, percentile, mse, ema) need ``deployq.calib``.
LOCAL_CALIB = ("naive", "minmax")
CALIB_MODES = ("naive", "minmax", "ema", "kl", "percentile", "mse")
#: Evaluation batch (online input ranges are per evaluation batch).
EVAL_BATCH = 250


@dataclass(frozen=True)
class SimOptions:
    """One simulated configuration (defaults follow the seed, except signed inputs and per-channel weights)."""

    model: str = "resnet20"
    weight_bits: int = 8
    input_bits: int = 8
    input_signed: bool = True
    quant_type: str = "channel"
    input_offline: bool = False
    calib_mode: str = "naive"  # how offline ranges are calibrated; unused while input_offline is False
    calib_epochs: int = 3
    exclude_first_conv: bool = False
    fake_bn: bool | None = None  # None: the profile's fold_bn
    num_sample: int = 5
    batch_size: int = 64
    seed: int = 0
    profile: str = "custom"
    algorithm: str = "qat"

    def check(self) -> None:
        """Raise ValueError naming a bad option and the supported values."""
        if self.model not in BUILTIN_MODELS:
            raise ValueError(f"--model {self.model!r} is not a built-in model; supported: {', '.join(BUILTIN_MODELS)}")
        if self.quant_type not in QUANT_TYPE_SCHEMES:
            raise ValueError(f"--quant-type {self.quant_type!r}; supported: {', '.join(QUANT_TYPE_SCHEMES)}")
        if self.calib_mode not in CALIB_MODES:
            raise ValueError(f"--calib-mode {self.calib_mode!r}; supported: {', '.join(CALIB_MODES)}")
        for name in ("calib_epochs", "num_sample", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")


@dataclass
class SimResult:
    options: SimOptions
    fp32_top1: float
    quant_top1: float
    config_list: list[dict[str, Any]]
    description: str
    seconds: float


def first_conv(net: gluon.Block) -> str:
    """Structural name of the first Conv2D of ``net`` (block-tree order)."""
    for path, b in block_paths(net).items():
        if path and type(b).__name__ in ("Conv2D", "QuantConv2D"):
            return path
    raise ValueError("the net has no Conv2D layer")


def build_config(opts: SimOptions, net: gluon.Block) -> list[dict[str, Any]]:
    """The config_list for ``opts``. Unsigned inputs are symmetric-unsigned ([0, T], the seed's uint8)."""
    entry: dict[str, Any] = {
        "op_types": ["Conv2D", "Dense"],
        "quant_types": ["weight", "input"],
        "quant_bits": {"weight": opts.weight_bits, "input": opts.input_bits},
        "quant_dtype": {"weight": "int", "input": "int" if opts.input_signed else "uint"},
        "quant_scheme": {"weight": QUANT_TYPE_SCHEMES[opts.quant_type], "input": "per_tensor_symmetric"},
        "input_mode": "offline" if opts.input_offline else "online",
    }
    if opts.fake_bn is not None:
        entry["fake_bn"] = opts.fake_bn
    cfg = [entry]
    if opts.exclude_first_conv:
        cfg.append({"op_names": [first_conv(net)], "exclude": True})
    return cfg


# ---------------------------------------------------------------------- calibration

def _collect_ranges(qnet: gluon.HybridBlock, x: np.ndarray, epochs: int, batch_size: int, seed: int,
                    momentum: float | None) -> dict[str, tuple[float, float]]:
    """Per quantized layer input (lo, hi) of the fp32 graph (``deployq.float_mode``) via forward pre-hooks: EMA
    over batches (``momentum``; the first batch initialises) or min/max over all (``momentum=None``). Hooks fire
    only un-hybridized, so the net is un-hybridized for the passes and re-hybridized after if it was."""
    layers = api.quant_layers(qnet)
    seen: dict[str, list[mx.nd.NDArray]] = {n: [] for n in layers}

    def hook(name: str):
        def fn(_blk, inputs):
            a = inputs[0]
            seen[name].append(mx.nd.concat(a.min().reshape((1,)), a.max().reshape((1,)), dim=0))
        return fn

    was_active = bool(getattr(qnet, "_active", False))
    qnet.hybridize(active=False)
    handles = [b.register_forward_pre_hook(hook(n)) for n, b in layers.items()]
    try:
        with api.float_mode(qnet), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is not used by any computation.*")
            for ep in range(epochs):
                for xb, _ in batches(x, None, batch_size, shuffle=True, seed=seed + ep):
                    qnet(mx.nd.array(xb))
    finally:
        for h in handles:
            h.detach()
        if was_active:
            qnet.hybridize(static_alloc=True)
    out = {}
    for name, vals in seen.items():
        if not vals:
            continue
        r = mx.nd.stack(*vals).asnumpy()
        if momentum is None:
            out[name] = (float(r[:, 0].min()), float(r[:, 1].max()))
            continue
        lo, hi = r[0]
        for blo, bhi in r[1:]:
            lo, hi = momentum * lo + (1 - momentum) * blo, momentum * hi + (1 - momentum) * bhi
        out[name] = (float(lo), float(hi))
    return out


def calibrate_ranges(qnet: gluon.HybridBlock, x: np.ndarray, method: str = "naive", epochs: int = 3,
                     seed: int = 0, batch_size: int = 64, profile: str = "custom") -> dict[str, tuple[float, float]]:
    """Set the input range of every quantized layer of ``qnet`` from the calibration images ``x``.

    Ranges come from the fp32 graph's layer inputs (``deployq.float_mode``; BatchNorm in inference):
    - ``naive`` (the seed's EMA calibration): ``epochs`` shuffled passes, EMA m=0.9, first batch initialises;
    - ``minmax``: min/max over all images, one pass;
    - anything else (``ema``, ``kl``, ``percentile``, ``mse``): ``deployq.calib`` (when installed).
    Returns the ranges, by layer name.
    """
    if method not in LOCAL_CALIB:
        try:
            from . import calib  # type: ignore[attr-defined]
        except ImportError as e:
            raise ValueError(f"calibration method {method!r} needs deployq.calib, which is not installed in this "
                             f"build; available here: {', '.join(LOCAL_CALIB)}") from e
        sf = calib.calibrate(qnet, x, method=method, profile=profile, quiet=True, batch_size=batch_size)
        calib.apply(qnet, sf)
        return {n: b.input_range() for n, b in api.quant_layers(qnet).items()}
    if method == "naive":
        ranges = _collect_ranges(qnet, x, epochs, batch_size, seed, momentum=0.9)
    else:
        ranges = _collect_ranges(qnet, x, 1, batch_size, seed, momentum=None)
    layers = api.quant_layers(qnet)
    for name, (lo, hi) in ranges.items():
        if layers[name].layer_config.input is not None:
            layers[name].set_input_range(lo, hi)
    return ranges


# ---------------------------------------------------------------------- one configuration / a sweep

def simulate(opts: SimOptions, quiet: bool = True, fp32_top1: float | None = None,
             test: Split | None = None) -> SimResult:
    """Quantize the cached fp32 built-in model with ``opts``, calibrate if offline, and evaluate both."""
    opts.check()
    t0 = time.time()
    seed_everything(opts.seed)
    test = test or load_mnist5k("test")
    net = get_trained(opts.model, verbose=not quiet)
    if fp32_top1 is None:
        fp32_top1 = evaluate(net, test, batch_size=EVAL_BATCH)
    cfg = build_config(opts, net)
    api.quantize(net, cfg, opts.profile, opts.algorithm)
    if opts.input_offline:
        train = load_mnist5k("train")
        idx = class_balanced_subset(train.y, opts.num_sample, opts.seed)
        calibrate_ranges(net, train.x[idx], opts.calib_mode, opts.calib_epochs, opts.seed, opts.batch_size,
                         opts.profile)
    net.hybridize(static_alloc=True)
    acc = evaluate(net, test, batch_size=EVAL_BATCH)
    return SimResult(opts, fp32_top1, acc, cfg, api.describe(net), time.time() - t0)


#: The default sweep grid (PTQ only): changes from the SimOptions defaults, one row each.
DEFAULT_GRID: tuple[dict[str, Any], ...] = (
    {},
    {"input_offline": True},
    {"input_offline": True, "quant_type": "layer"},
    {"input_offline": True, "fake_bn": True},
    {"input_offline": True, "quant_type": "layer", "fake_bn": True},
    {"input_offline": True, "input_signed": False},
    {"input_offline": True, "input_signed": False, "exclude_first_conv": True},
    {"input_offline": True, "weight_bits": 4},
    {"input_offline": True, "weight_bits": 4, "quant_type": "layer"},
    {"input_offline": True, "weight_bits": 4, "input_bits": 4},
    {"input_offline": True, "weight_bits": 4, "input_bits": 4, "exclude_first_conv": True},
)
TABLE_COLUMNS = ("IN dtype", "IN offline", "WT dtype", "WT qtype", "Merge BN", "w/o 1st conv", "Top-1")


def _row(r: SimResult) -> dict[str, Any]:
    o = r.options
    merge = o.fake_bn if o.fake_bn is not None else load_profile(o.profile).fold_bn
    return {"IN dtype": f"{'int' if o.input_signed else 'uint'}{o.input_bits}",
            "IN offline": o.input_offline, "WT dtype": f"int{o.weight_bits}", "WT qtype": o.quant_type,
            "Merge BN": merge, "w/o 1st conv": o.exclude_first_conv, "Top-1": r.quant_top1,
            "fp32": r.fp32_top1, "options": asdict(o), "seconds": round(r.seconds, 1)}


def sweep(model: str = "resnet20", grid: tuple[dict[str, Any], ...] | list[dict[str, Any]] = DEFAULT_GRID,
          base: SimOptions | None = None, quiet: bool = True) -> list[dict[str, Any]]:
    """Run ``simulate`` for every grid entry (applied on top of ``base``); returns one dict per row with the
    table columns plus ``fp32``, ``options`` and ``seconds``. ``fake_bn`` defaults to False here (the seed's
    default: no merge) unless the entry sets it."""
    base = replace(base or SimOptions(fake_bn=False), model=model)
    test = load_mnist5k("test")
    fp32 = evaluate(get_trained(model, verbose=not quiet), test, batch_size=EVAL_BATCH)
    rows = []
    bar = progress(total=len(grid), desc=f"sweep {model}", disable=quiet)
    for g in grid:
        rows.append(_row(simulate(replace(base, **g), quiet=True, fp32_top1=fp32, test=test)))
        bar.update(1)
    bar.close()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The seed's results table (markdown)."""
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{100 * v:.2f}%"
        return str(v)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
    if rows:
        lines.append(f"\nfp32 top-1: {100 * rows[0]['fp32']:.2f}% (MNIST-5k test, 1000 images)")
    return "\n".join(lines)
