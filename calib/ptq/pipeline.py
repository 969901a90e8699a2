"""``optimize``: the cheapest post-training pipeline that meets a target accuracy drop on validation images.

Steps, in order of cost; each is scored on the validation images and the first whose drop (fp32 accuracy minus
the simulated quantized accuracy) is at most ``target_drop`` is returned:

1. ``calibrate:<method>`` for each calibrator of ``methods`` (cheap first; the best one is kept for the rest);
2. ``cle+bc``: cross-layer equalization before calibration, empirical bias correction after it;
3. ``adaround``: learned rounding on top of the better of 1 and 2 (with 2: CLE, calibration, AdaRound, then bias
   correction; AdaRound and bias correction both match the fp32 graph taken before either changed the floats);
4. ``adaround+qdrop``: the same with QDrop's random dropping of input quantization;
5. ``brecq``: block reconstruction with QDrop (``deployq.calib.ptq.brecq``) in place of AdaRound;
6. ``fallback:<n>``: the best learned-free pipeline (1 or 2) with the n most sensitive layers
   (``deployq.sensitivity``'s ranking) in fp32, n = 1 .. ``max_fp32_layers``.

Without a step that meets the target, the best net found is returned (``met`` False).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from mxnet import gluon

from deployq.progress import progress

from .adaround import AdaRoundConfig
from .brecq import BrecqConfig

NetFactory = Callable[[], gluon.HybridBlock]
STEPS = ("calibrate", "cle+bc", "adaround", "adaround+qdrop", "brecq", "fallback")
DEFAULT_METHODS = ("minmax", "kl", "aciq", "mse", "eq")
LAYER_TYPES = ["Conv2D", "Dense"]


@dataclass
class StepResult:
    """One scored pipeline: its name, validation accuracy, drop from fp32, gain over the best before it,
    seconds, whether it met the target, and what it did."""

    step: str
    accuracy: float
    drop: float
    gain: float
    seconds: float
    met: bool
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizeResult:
    """The chosen quantized net and the trail of every step scored."""

    net: gluon.HybridBlock
    chosen: str
    fp32_accuracy: float
    target_drop: float
    met: bool
    config_list: list[dict[str, Any]]
    steps: list[StepResult]

    def summary(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "fp32_accuracy": self.fp32_accuracy, "target_drop": self.target_drop,
                "met": self.met, "config_list": self.config_list,
                "steps": [{k: v for k, v in vars(s).items()} for s in self.steps]}


def _accuracy(net: gluon.HybridBlock, x: np.ndarray, y: np.ndarray) -> float:
    from deployq.zoo import predict

    return float(np.mean(predict(net, x).argmax(1) == y))


def build(net: gluon.HybridBlock, xc: np.ndarray, profile: Any, config_list: list[dict[str, Any]] | None,
          method: str, cle: bool = False, bc: bool = False, ada: AdaRoundConfig | None = None, quiet: bool = True,
          brecq: BrecqConfig | None = None) -> tuple[gluon.HybridBlock, dict[str, Any]]:
    """One pipeline on fp32 ``net`` (quantized in place): quantize, [CLE], calibrate with ``method`` (and the
    outputs' ranges), [AdaRound with ``ada`` | block reconstruction with ``brecq``], [bias correction]; returns
    the net and what was done."""
    if ada is not None and brecq is not None:
        raise ValueError("build: AdaRound (ada) or block reconstruction (brecq), not both")
    from deployq.calib import apply, calibrate

    import deployq
    from deployq.layerwise import calibrate_outputs

    from .adaround import adaround
    from .biascorr import bias_correction
    from .brecq import brecq as block_reconstruction
    from .cle import equalize
    from .layers import fp32_graph

    net = deployq.quantize(net, config_list, profile=profile)
    detail: dict[str, Any] = {"method": method}
    if cle:
        detail["cle_pairs"] = len(equalize(net, xc.shape[1:])["pairs"])
    apply(net, calibrate(net, xc, method=method, profile=profile, quiet=True))
    calibrate_outputs(net, xc)
    # both passes change the stored floats (the float graph too): each matches the fp32 net as it was before them
    ref = fp32_graph(net, xc.shape[1:]) if bc or ada is not None or brecq is not None else None
    if ada is not None:
        rep = adaround(net, xc, ada, quiet=quiet, reference=ref)
        detail["adaround_seconds"], detail["iters"] = rep["seconds"], [u["iters"] for u in rep["units"]]
    if brecq is not None:
        rep = block_reconstruction(net, xc, brecq, quiet=quiet, reference=ref)
        detail["brecq_seconds"], detail["brecq_blocks"] = rep["seconds"], len(rep["units"])
        detail["iters"] = [u["iters"] for u in rep["units"]]
    if bc:
        bias_correction(net, xc, reference=ref)
    return net, detail


def rank_layers(make_net: NetFactory, x_calib: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, profile: Any,
                config_list: list[dict[str, Any]]) -> list[str]:
    """The quantized layers, most sensitive first, as ``deployq sensitivity`` ranks them (the logits' SQNR
    against fp32 with only that layer quantized; min-max input ranges), but on this run's profile and config
    list (the layer at the bits the config gives it; ``deployq.sensitivity.analyse`` ranks at the profile's
    default bits)."""
    import deployq
    from deployq.sensitivity import _Evaluator

    ev = _Evaluator(make_net, x_calib, x_val, y_val, profile)
    probe = deployq.quantize(make_net(), config_list, profile=profile)
    names = [k for k in deployq.quant_layers(probe) if k in ev.ranges]
    sqnr = {k: ev.score([*config_list, {"op_names": [o for o in names if o != k], "exclude": True}])["sqnr_db"]
            if len(names) > 1 else 0.0 for k in names}
    return sorted(names, key=lambda k: sqnr[k])


class _Pipeline:
    def __init__(self, make_net: NetFactory, xc: np.ndarray, profile: Any, config_list: list[dict[str, Any]] | None,
                 quiet: bool) -> None:
        self.make_net, self.xc, self.profile, self.quiet = make_net, xc, profile, quiet
        self.config_list = config_list

    def build(self, method: str, cle: bool = False, bc: bool = False, ada: AdaRoundConfig | None = None,
              config_list: list[dict[str, Any]] | None = None, brecq: BrecqConfig | None = None
              ) -> tuple[gluon.HybridBlock, dict[str, Any]]:
        return build(self.make_net(), self.xc, self.profile, config_list or self.config_list, method, cle, bc, ada,
                     self.quiet, brecq)


def optimize(make_net: NetFactory, x_calib: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             target_drop: float = 0.01, profile: Any = "ncnn", config_list: list[dict[str, Any]] | None = None,
             methods: tuple[str, ...] = DEFAULT_METHODS, steps: tuple[str, ...] = STEPS,
             adaround_config: AdaRoundConfig | None = None, qdrop: float = 0.5, max_fp32_layers: int = 4,
             quiet: bool = False, on_step: Callable[[StepResult], None] | None = None,
             brecq_config: BrecqConfig | None = None) -> OptimizeResult:
    """Run the steps of the module docstring until one meets ``target_drop`` (a share: 0.01 = 1 point).

    ``make_net`` returns a fresh fp32 net (each step quantizes its own); ``x_calib``: calibration images (also
    AdaRound's), ``x_val``/``y_val``: validation images and labels; ``config_list``/``profile`` as
    ``deployq.quantize``; ``steps``: a subset of :data:`STEPS`; ``on_step`` is called with each scored step;
    ``brecq_config``: the brecq step's (default: ``adaround_config``'s values with QDrop ``qdrop``)."""
    from deployq.api import quant_layers

    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown optimize step(s) {unknown}; steps: {', '.join(STEPS)}")
    if not methods:
        raise ValueError("optimize needs at least one calibration method")
    from deployq.calib import CALIBRATORS

    bad = [m for m in methods if m not in CALIBRATORS]
    if bad:
        raise ValueError(f"unknown calibration method(s) {bad}; available: {', '.join(sorted(CALIBRATORS))}")
    ada = adaround_config or AdaRoundConfig()
    fp32 = _accuracy(make_net(), x_val, y_val)
    pipe = _Pipeline(make_net, np.asarray(x_calib, np.float32), profile, config_list, quiet)
    trail: list[StepResult] = []
    best: dict[str, Any] = {"acc": -1.0}
    bar = progress(total=None, desc="optimize", disable=quiet)

    def score(name: str, build: Callable[[], tuple[gluon.HybridBlock, dict[str, Any]]], **keep: Any) -> bool:
        t0 = time.perf_counter()
        net, detail = build()
        acc = _accuracy(net, x_val, y_val)
        r = StepResult(name, acc, fp32 - acc, acc - best["acc"] if best["acc"] >= 0 else 0.0, time.perf_counter() - t0,
                       fp32 - acc <= target_drop, detail)
        trail.append(r)
        bar.update(1)
        bar.set_postfix_str(f"{name} {acc:.4f}")
        if on_step is not None:
            on_step(r)
        if acc > best["acc"]:
            best.update(acc=acc, net=net, name=name, **keep)
        return r.met

    def done() -> OptimizeResult:
        bar.close()
        met = bool(trail) and trail[-1].met
        cfg = best.get("config_list", config_list) or [{"op_types": LAYER_TYPES}]
        return OptimizeResult(best["net"], best["name"], fp32, target_drop, met, cfg, trail)

    for m in methods:
        if score(f"calibrate:{m}", lambda m=m: pipe.build(m), method=m, cle=False):
            return done()
        if "calibrate" not in steps:
            break
    plain = {"method": best["method"], "cle": False}
    if "cle+bc" in steps:
        if score("cle+bc", lambda: pipe.build(plain["method"], cle=True, bc=True), method=plain["method"], cle=True):
            return done()
        if best["name"] == "cle+bc":
            plain["cle"] = True
    if "adaround" in steps:
        if score("adaround", lambda: pipe.build(plain["method"], plain["cle"], plain["cle"], ada),
                 method=plain["method"], cle=plain["cle"]):
            return done()
    if "adaround+qdrop" in steps and qdrop > 0:
        if score("adaround+qdrop", lambda: pipe.build(plain["method"], plain["cle"], plain["cle"],
                                                     replace(ada, qdrop=qdrop)),
                 method=plain["method"], cle=plain["cle"]):
            return done()
    if "brecq" in steps:
        bq = brecq_config or BrecqConfig(**{**vars(ada), "qdrop": qdrop})
        if score("brecq", lambda: pipe.build(plain["method"], plain["cle"], plain["cle"], brecq=bq),
                 method=plain["method"], cle=plain["cle"]):
            return done()
    if "fallback" in steps and max_fp32_layers > 0:
        base = config_list or [{"op_types": LAYER_TYPES}]
        ranked = rank_layers(make_net, x_calib, x_val, y_val, profile, base)
        names = list(quant_layers(best["net"]))
        kept: list[str] = []
        for layer in [k for k in ranked if k in names][:max_fp32_layers]:
            kept.append(layer)
            cfg = [*base, {"op_names": sorted(kept), "exclude": True}]
            if score(f"fallback:{len(kept)}", lambda cfg=cfg: pipe.build(plain["method"], plain["cle"],
                                                                          plain["cle"], config_list=cfg),
                     config_list=cfg, fp32_layers=list(kept)):
                return done()
    return done()
