"""gluoncv zoo families on Tengine's aarch64 build under qemu against deployq's arm64 model (opt-in, slow).

Each family (``tests/exporters/zoo_cases.py``: random weights, generated images) is exported for the arm64 kernel
family (min-max calibration on the images; a family with a layer Tengine's aarch64 build miscomputes or crashes
on is refused, and reported as such), turned into an int8 tmfile by the x86 tools, run by ``tengine_run`` under
qemu-user and compared code for code with :class:`deployq.exporters.tengine.arm64.Arm64TengineReference` (and
with the x86 model, for scale). Needs the variables of ``../shared/engines/build.sh`` and
``tests/engines/arm/build.sh``::

    python -m tests.engines.arm.tengine_zoo [--families cifar_resnet20_v1,mobilenet0.5:64] [--images 8] [--json F]

A family is ``name[:size[:classes]]`` (default size/classes: zoo_cases's, 1000 classes at 224 for the others).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

#: the default families: plain, residual, depthwise, Concat (fire modules), and two the arm64 export refuses
DEFAULT = ("cifar_resnet20_v1", "mobilenet0.5:64", "resnet18_v1:64", "squeezenet1.1:224:32", "googlenet:224",
           "mobilenetv2_0.25:64")


def family(spec: str):
    from tests.exporters.zoo_cases import BY_NAME, Family

    name, *rest = spec.split(":")
    base = BY_NAME.get(name, Family(name, 224))
    size = int(rest[0]) if rest else base.size
    classes = int(rest[1]) if len(rest) > 1 else base.classes
    return Family(name, size, classes)


def run_family(spec: str, n_images: int, root: Path, tools, cmd: list[str]) -> dict:
    """Export ``spec`` for arm64, run it emulated and in both NumPy models; a JSON-able row."""
    from deployq.exporters.ir.frontend import from_files
    from deployq.exporters.tengine.arm64 import Arm64TengineReference, run_arm_runner
    from deployq.exporters.tengine.cli import export_tengine
    from deployq.exporters.tengine.lower import TengineExportError
    from deployq.exporters.tengine.reference import TengineReference
    from deployq.exporters.tengine.runtime import build_int8_tmfile, export_files

    from deployq.profiles import load_profile
    from tests.exporters.zoo_cases import export, images

    fam = family(spec)
    row: dict = {"family": fam.name, "size": fam.size, "classes": fam.classes, "images": n_images}
    t0 = time.time()
    files = export(fam, root / "zoo", n_images=4)
    graph = from_files(files.symbol, files.params, fam.input_shape)
    prof = load_profile("tengine")
    prof = prof.with_options(extra={**prof.extra, "kernels": "arm64"})
    calib = [images(fam.size, 16, seed=7)]
    out = root / f"{fam.name}-{fam.size}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_tengine(graph, out, fam.name, calib, profile=prof)
    except TengineExportError as e:
        return {**row, "status": "refused", "reason": str(e), "seconds": round(time.time() - t0, 1)}
    x = images(fam.size, n_images, seed=11)
    f = export_files(out)
    arm, x86 = Arm64TengineReference(*f), TengineReference(*f)
    o = arm.graph.outputs[0]
    want = arm.run_int8(x)[o].reshape(n_images, -1).astype(np.int64)
    want86 = np.concatenate([x86.run_int8(x[i:i + 1])[o] for i in range(n_images)]).reshape(n_images, -1)
    tm = build_int8_tmfile(out, root / f"{fam.name}.tmfile", tools)
    t1 = time.time()
    got = run_arm_runner(cmd, tm, x)[0].astype(np.int64)
    return {**row, "status": "ok", "identical_images": float(np.all(got == want, axis=1).mean()),
            "max_codes": int(np.abs(got - want).max()), "top1": float((got.argmax(1) == want.argmax(1)).mean()),
            "x86_model_identical_images": float(np.all(got == want86, axis=1).mean()),
            "x86_model_max_codes": int(np.abs(got - want86).max()),
            "qemu_seconds": round(time.time() - t1, 1), "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    from deployq.exporters.tengine.arm64 import find_arm_runner
    from deployq.exporters.tengine.runtime import find_tools

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(DEFAULT))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--json", help="write the rows here too")
    a = p.parse_args(argv)
    tools, why = find_tools()
    cmd, why_arm = find_arm_runner()
    if tools is None or cmd is None:
        print(f"tengine_zoo: needs Tengine's x86 tools and the aarch64 runner: {why or why_arm}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="deployq-arm-zoo-") as d:
        for spec in a.families.split(","):
            try:
                r = run_family(spec, a.images, Path(d), tools, cmd)
            except Exception as e:  # noqa: BLE001 - a benchmark row, not a product path
                r = {"family": spec, "status": "error", "reason": f"{type(e).__name__}: {e}"}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
