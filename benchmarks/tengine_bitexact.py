"""Tengine bit-exactness sweep: gluoncv families (random weights, generated images) exported with
``deployq export-tengine``, run through Tengine's convert_tool + quant_tool_int8 -f and its x86 runtime, and
compared tensor by tensor with deployq's NumPy model of Tengine (``exporters/tengine/reference.py``).

Needs the tools (``eval "$(bash ../shared/engines/build.sh)"``). Prints, per family, the first layer whose int8
codes differ (if any) and the share of images whose output codes are identical::

    python benchmarks/tengine_bitexact.py resnet50_v1c:64 resnext50_32x4d:64 vgg11_bn:32 --images 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check(name: str, size: int, n: int, work: Path) -> dict:
    from deployq.exporters.tengine.reference import TengineReference
    from deployq.exporters.tengine.runtime import TengineGraph, TengineTools, build_int8_tmfile, export_files

    from tests.exporters.zoo_cases import BY_NAME, Family, export, images
    from tests.exporters.zoo_check import cli

    fam = Family(name, size, BY_NAME[name].classes)
    z = export(fam, work / name, n_images=16)
    d = work / name / "tengine"
    step = cli("export-tengine", "--symbol", z.symbol, "--params", z.params, "--data", z.data,
               "--input-shape", f"1,3,{size},{size}", "--out", d)
    if step.rc != 0:
        return {"family": name, "error": step.message}
    tools = TengineTools.from_env()
    tm = build_int8_tmfile(d, d / "model-int8.tmfile", tools)
    sym, params, table, shape = export_files(d)
    x = images(size, n, 7)
    ref = TengineReference(sym, params, table, shape)
    vals = ref.run_int8(x)
    with TengineGraph(tm, shape, tools.lib, keep_all=True) as g:
        runs = [g.run_codes(g.quantize_input(x[i:i + 1])) for i in range(n)]
    first = None
    for node in ref.graph.nodes:
        t = ref.name_of[node.output]
        if first is None and t in runs[0]:
            got = np.concatenate([r[t] for r in runs])
            if not np.array_equal(got, vals[node.output].reshape(got.shape)):
                first = f"{node.name} ({node.op})"
    out = np.concatenate([r[""] for r in runs]).reshape(n, -1)
    want = vals[ref.graph.outputs[0]].reshape(n, -1)
    return {"family": name, "size": size, "images": n, "first_diff": first,
            "identical_images": float(np.all(out == want, axis=1).mean()),
            "top1": float((out.argmax(1) == want.argmax(1)).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("families", nargs="+", help="NAME:SIZE, e.g. resnet50_v1c:64")
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.families:
            name, size = spec.split(":")
            print(check(name, int(size), args.images, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
