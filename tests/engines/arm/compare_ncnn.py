"""Measure ncnn's aarch64 build (under qemu) against deployq's simulation and ncnn's x86 runtime.

    python -m tests.engines.arm.compare_ncnn EXPORT_DIR [EXPORT_DIR ...] [--images 50] [--cpu cortex-a53]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from deployq.exporters.ncnn.runtime import run

import deployq
from deployq.data import load_mnist5k
from deployq.zoo import predict
from tests.engines.arm.qemu import find_runner, run_arm


def stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Share of images whose outputs are bit-identical, max abs difference, top-1 agreement."""
    return {"identical": float(np.mean(np.all(a == b, axis=1))), "max_diff": float(np.abs(a - b).max()),
            "top1_agree": float(np.mean(a.argmax(1) == b.argmax(1)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--cpu", default=None)
    a = ap.parse_args()
    cmd, why = find_runner()
    if cmd is None:
        raise SystemExit(why)
    x = load_mnist5k("test").x[:: 1000 // a.images][: a.images]
    for d in map(Path, a.exports):
        man = json.loads((d / "deployq-export.json").read_text())
        f = man["files"]
        param, bin_ = d / f["param"], d / f["bin"]
        sim = predict(deployq.load(str(d / f["qnet"])), x)
        x86 = run(param, bin_, x, packing=False)
        x86p = run(param, bin_, x, packing=True)
        rep = {"model": man["model"], "images": len(x), "x86_vs_sim": stats(x86, sim),
               "x86_packed_vs_sim": stats(x86p, sim)}
        for packing in (True, False):
            arm = run_arm(cmd, param, bin_, x, packing=packing, cpu=a.cpu)
            tag = "arm_packed" if packing else "arm_unpacked"
            rep[f"{tag}_vs_sim"] = stats(arm, sim)
            rep[f"{tag}_vs_x86"] = stats(arm, x86)
        print(json.dumps(rep))


if __name__ == "__main__":
    main()
