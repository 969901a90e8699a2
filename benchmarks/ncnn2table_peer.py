"""ncnn's own post-training quantizer as a peer: the same fp32 net through ``caffe2ncnn`` -> ``ncnn2table``
(``method=aciq|kl|eq``) -> ``ncnn2int8`` -> ncnn's runtime.

The fp32 ncnn model comes from deployq's Caffe pair (``<name>.prototxt``/``.caffemodel`` of the ncnn export,
BN folded, float weights), converted with ncnn's ``caffe2ncnn`` (the route docs/ncnn-export.md offers for ncnn's
tools). The calibration images are written as ``.npy`` files of the exact float32 tensors deployq calibrates on
and read with ``type=1``, so ncnn2table sees bit-identical inputs (the image route, PNGs with ``mean=`` /
``norm=`` / ``shape=`` / ``pixel=``, gives the same tensors up to float rounding of ``(p - mean) * norm``).

This ncnn2table gives every 3x3 stride-1 dilation-1 Convolution 6-bit weights (``31 / absmax``, ncnn's int8
winograd F43 rule) in every run: its models are ncnn's ``winograd_3x3: six_bit`` setting. ``ncnn2table`` of
this ncnn (commit a4d2ea1) crashes with ``method=eq``: ``quantize_EQ`` reads ``listspaths[j][i]`` (weight channel
and layer index) where it means ``[jj][ii]`` (ncnn2table.cpp lines 1572/1577, 1689/1694), which leaves the one
list at the second channel; the row then records the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = ("caffe2ncnn", "ncnn2table", "ncnn2int8")
METHODS = ("aciq", "kl", "eq")


def fidelity(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How close int8 ``logits`` are to the fp32 net's ``ref``: top-1 agreement and the logits' SQNR (dB)."""
    err = float(np.sum((logits.astype(np.float64) - ref) ** 2))
    return {"fp32_agreement": float(np.mean(logits.argmax(1) == ref.argmax(1))),
            "sqnr_db": float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(err, 1e-30)))}


def tools_missing() -> str | None:
    """Why ncnn's tools cannot run here (None when they can)."""
    b = os.environ.get("NCNN_BIN")
    if not b:
        return "NCNN_BIN not set (bash ../shared/engines/build.sh builds ncnn's tools and prints it)"
    missing = [t for t in TOOLS if not (Path(b) / t).is_file()]
    return f"{', '.join(missing)} not in NCNN_BIN={b}" if missing else None


def _output_blob(param: Path) -> str:
    last = param.read_text().splitlines()[-1].split()
    return last[4 + int(last[2])]


def _failure(r: subprocess.CompletedProcess) -> str:
    tail = [s for s in (r.stderr or "").splitlines() if s.strip()][-1:] or [""]
    why = f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit {r.returncode}"
    return f"{why} (last output: {tail[0].strip()[:100]})"


def ncnn2table_rows(name: str, xc: np.ndarray, x: np.ndarray, y: np.ndarray,
                    methods: tuple[str, ...] = METHODS, threads: int = 1) -> dict[str, dict]:
    """Top-1 on ``x``/``y`` in ncnn's runtime of ncnn2table's model for each method, calibrated on ``xc``, and
    its :func:`fidelity` to the converted fp32 model (``ncnn fp32``: no table, its top-1 too). A failing tool
    gives ``accuracy`` None and ``error``."""
    from deployq.exporters.ncnn.export import export_qnet, minmax_calibrate
    from deployq.exporters.ncnn.runtime import run

    import deployq
    from deployq.zoo import get_trained

    bin_ = Path(os.environ["NCNN_BIN"])
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        net = deployq.quantize(get_trained(name, verbose=False), profile="ncnn")
        minmax_calibrate(net, xc[:10])  # the export needs ranges; the Caffe pair holds only the float net
        files = export_qnet(net, tmp / "export", name)
        fp = tmp / "fp32"
        subprocess.run([bin_ / "caffe2ncnn", files["prototxt"], files["caffemodel"], f"{fp}.param", f"{fp}.bin"],
                       check=True, capture_output=True)
        blob = _output_blob(Path(f"{fp}.param"))
        t = time.perf_counter()
        ref = run(f"{fp}.param", f"{fp}.bin", x, output_blob=blob)
        out["ncnn fp32"] = {"accuracy": float(np.mean(ref.argmax(1) == y)), "seconds": time.perf_counter() - t}
        paths = []
        for i, img in enumerate(np.asarray(xc, np.float32)):
            paths.append(tmp / f"calib{i:04d}.npy")
            np.save(paths[-1], np.ascontiguousarray(img))
        (tmp / "list.txt").write_text("".join(f"{p}\n" for p in paths))
        c, h, w = xc.shape[1:]
        for m in methods:
            t = time.perf_counter()
            table, q = tmp / f"{m}.table", tmp / f"{m}-int8"
            r = subprocess.run([bin_ / "ncnn2table", f"{fp}.param", f"{fp}.bin", tmp / "list.txt", table,
                                f"shape=[{w},{h},{c}]", "type=1", f"method={m}", f"thread={threads}"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                out[f"ncnn2table {m}"] = {"accuracy": None, "error": f"ncnn2table {_failure(r)}",
                                          "seconds": time.perf_counter() - t}
                continue
            r = subprocess.run([bin_ / "ncnn2int8", f"{fp}.param", f"{fp}.bin", f"{q}.param", f"{q}.bin", table],
                               capture_output=True, text=True)
            if r.returncode != 0:
                out[f"ncnn2table {m}"] = {"accuracy": None, "error": f"ncnn2int8 {_failure(r)}",
                                          "seconds": time.perf_counter() - t}
                continue
            logits = run(f"{q}.param", f"{q}.bin", x, output_blob=blob)
            out[f"ncnn2table {m}"] = {"accuracy": float(np.mean(logits.argmax(1) == y)),
                                      **fidelity(logits, ref), "seconds": time.perf_counter() - t}
    return out
