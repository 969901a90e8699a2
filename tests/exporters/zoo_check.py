"""One zoo family through the user's CLI path, in-process (``deployq.cli.main``): calibrate, export to ncnn /
ONNX / Tengine, ``deployq verify`` (int8 against deployq's simulation) and fp32 parity of the exported fp32
model against MXNet's own forward of the json/params.

A non-zero exit with one ``deployq ...: error:`` line is a refusal; an ``internal error`` line or an exception out
of ``main`` is a crash.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .zoo_cases import Family, ZooFiles, export, mxnet_forward

ENGINES = ("ncnn", "onnx", "tengine")
FP32_TOL = 1e-3  # relative max error of the exported fp32 model against MXNet


@dataclass
class Step:
    """One ``deployq`` command: exit code, stdout, stderr (or the exception that escaped ``main``)."""

    argv: list[str]
    rc: int
    out: str
    err: str
    exception: str = ""

    @property
    def crashed(self) -> bool:
        return bool(self.exception) or "internal error" in self.err

    @property
    def message(self) -> str:
        """The last non-empty stderr line (the error line), or the exception."""
        if self.exception:
            return self.exception
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit {self.rc} without a message"


@dataclass
class EngineResult:
    """Where one engine stands on one family."""

    engine: str
    status: str = "pending"  # ok | refused | crashed | fp32-mismatch | int8-mismatch | unexportable
    converted: bool = False
    fp32_error: float | None = None
    fp32_ok: bool | None = None
    int8_ok: bool | None = None
    agreement: float | None = None
    max_error_steps: float | None = None
    message: str = ""
    caffe: bool | None = None
    names_node: bool | None = None  # a refusal/crash message names a node of the model's graph
    seconds: float = 0.0


@dataclass
class FamilyResult:
    family: str
    size: int
    engines: dict[str, EngineResult] = field(default_factory=dict)
    error: str = ""  # building the case itself failed (a harness or MXNet problem, not deployq's)

    def to_dict(self) -> dict:
        return {"family": self.family, "size": self.size, "error": self.error,
                "engines": {k: asdict(v) for k, v in self.engines.items()}}


def node_names(symbol: str | Path) -> set[str]:
    """The operator node names of an MXNet symbol file, also without gluon's ``_fwd``/``_output`` suffixes."""
    names = {n["name"] for n in json.loads(Path(symbol).read_text())["nodes"] if n["op"] != "null"}
    return names | {n.removesuffix("_fwd").removesuffix("_output") for n in names}


def names_a_node(message: str, names: set[str]) -> bool:
    """Whether ``message`` names one of the graph's nodes (as a whole word)."""
    import re

    words = set(re.findall(r"[\w.]*\w", message))
    return bool(words & names)


def cli(*argv: str) -> Step:
    """``deployq ARGV`` in-process, stdout and stderr captured."""
    from deployq.cli import main

    out, err = io.StringIO(), io.StringIO()
    args = [str(a) for a in argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
    except SystemExit as e:  # argparse
        return Step(args, int(e.code or 0), out.getvalue(), err.getvalue())
    except BaseException as e:  # noqa: BLE001 - a crash is a result here
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return Step(args, -1, out.getvalue(), err.getvalue(), exception=tb)
    return Step(args, rc, out.getvalue(), err.getvalue())


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(len(b), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _fail(res: EngineResult, step: Step, names: set[str] | None = None) -> EngineResult:
    res.status = "crashed" if step.crashed else "refused"
    res.message = step.message
    if names is not None:
        res.names_node = names_a_node(res.message, names)
    return res


def _verify(res: EngineResult, export_dir: Path, data: Path, *extra: str) -> None:
    step = cli("verify", export_dir, "--data", data, "--json", *extra)
    try:
        rep = json.loads(step.out)
    except ValueError:
        rep = None
    if rep is None or "passed" not in rep:
        _fail(res, step)
        res.message = f"verify: {res.message}"
        return
    res.int8_ok = bool(rep["passed"])
    res.agreement = float(rep["agreement_sim_ties"])
    res.max_error_steps = float(rep["max_error_steps"])
    if not res.int8_ok:
        res.message = "verify: " + "; ".join(rep.get("breaches", []))


def _finish(res: EngineResult) -> EngineResult:
    if res.status == "pending":
        if res.fp32_ok is False:
            res.status = "fp32-mismatch"
            res.message = res.message or f"fp32 relative error {res.fp32_error:.3g} > {FP32_TOL}"
        elif res.int8_ok is False:
            res.status = "int8-mismatch"
        else:
            res.status = "ok"
    return res


def check_ncnn(z: ZooFiles, scales: Path, work: Path, x: np.ndarray, ref: np.ndarray) -> EngineResult:
    from deployq.exporters.ncnn.runtime import run

    res = EngineResult("ncnn")
    d = work / "ncnn"
    step = cli("export-ncnn", "--symbol", z.symbol, "--params", z.params, "--scales", scales, "--out", d)
    if step.rc != 0:
        return _fail(res, step, node_names(z.symbol))
    res.converted = True
    name = z.family.name
    res.caffe = (d / f"{name}.prototxt").exists() and (d / f"{name}.caffemodel").exists()
    try:
        res.fp32_error = rel_err(run(d / f"{name}.param", d / f"{name}.bin", x), ref)
        res.fp32_ok = res.fp32_error <= FP32_TOL
    except Exception as e:  # noqa: BLE001 - ncnn could not run what deployq wrote: a crash of the export
        res.status, res.message = "crashed", f"ncnn fp32 run: {type(e).__name__}: {e}"
        return res
    _verify(res, d, z.data)
    return _finish(res)


def check_onnx(z: ZooFiles, scales: Path, work: Path, x: np.ndarray, ref: np.ndarray) -> EngineResult:
    import onnxruntime as ort

    res = EngineResult("onnx")
    d = work / "onnx"
    step = cli("export-onnx", "--symbol", z.symbol, "--params", z.params, "--scales", scales, "--out", d)
    if step.rc != 0:
        return _fail(res, step, node_names(z.symbol))
    res.converted = True
    try:
        sess = ort.InferenceSession(str(d / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        out = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
        res.fp32_error = rel_err(out, ref)
        res.fp32_ok = res.fp32_error <= FP32_TOL
    except Exception as e:  # noqa: BLE001
        res.status, res.message = "crashed", f"onnxruntime fp32 run: {type(e).__name__}: {e}"
        return res
    _verify(res, d, z.data)
    return _finish(res)


def check_tengine(z: ZooFiles, scales: Path, work: Path, x: np.ndarray, ref: np.ndarray) -> EngineResult:
    """Tengine's export is int8 only: no fp32 parity; verify runs it in Tengine (or deployq's model of it)."""
    res = EngineResult("tengine")
    d = work / "tengine"
    step = cli("export-tengine", "--symbol", z.symbol, "--params", z.params, "--scales", scales,
               "--data", z.data, "--out", d)
    if step.rc != 0:
        return _fail(res, step, node_names(z.symbol))
    res.converted = True
    _verify(res, d, z.data, "--engine", "tengine")
    return _finish(res)


CHECKS = {"ncnn": check_ncnn, "onnx": check_onnx, "tengine": check_tengine}


def check_family(family: Family, work: str | Path, engines: tuple[str, ...] = ENGINES) -> FamilyResult:
    """Build ``family``, calibrate it (min-max on its images) and check each engine."""
    work = Path(work)
    fr = FamilyResult(family.name, family.size)
    try:
        z = export(family, work / "model")
        x = np.load(z.data)["x"]
        ref = mxnet_forward(z, x)
    except Exception as e:  # noqa: BLE001 - MXNet/gluoncv could not build it: reported, not deployq's crash
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        if family.unexportable:  # as expected: nothing to convert
            for eng in engines:
                fr.engines[eng] = EngineResult(eng, status="unexportable", message=f"{family.unexportable} ({why})")
        else:
            fr.error = f"building the case: {why}"
        return fr
    scales = work / "scales.json"
    shape = ",".join(str(s) for s in family.input_shape)
    t0 = time.perf_counter()
    step = cli("calibrate", "--symbol", z.symbol, "--params", z.params, "--input-shape", shape, "--data", z.data,
               "--method", "minmax", "--quiet", "--out", scales)
    if step.rc != 0:
        for e in engines:
            fr.engines[e] = _fail(EngineResult(e), step, node_names(z.symbol))
            fr.engines[e].message = f"calibrate: {fr.engines[e].message}"
            fr.engines[e].seconds = time.perf_counter() - t0
        return fr
    for e in engines:
        t = time.perf_counter()
        try:
            fr.engines[e] = CHECKS[e](z, scales, work, x, ref)
        except Exception as exc:  # noqa: BLE001 - a harness-side failure is still recorded, not raised
            fr.engines[e] = EngineResult(e, status="crashed", message=f"{type(exc).__name__}: {exc}")
        fr.engines[e].seconds = time.perf_counter() - t
    return fr
