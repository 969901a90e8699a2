"""Zoo coverage: every gluoncv classification family (its smallest member, random weights and BatchNorm
statistics, generated images; ``tests/exporters/zoo_cases.py``) through the user's CLI path — ``deployq calibrate``
(min-max), ``export-ncnn`` / ``export-onnx`` / ``export-tengine``, ``deployq verify`` (int8 against the simulation)
and fp32 parity of the exported fp32 model (ncnn's runtime, onnxruntime) against MXNet's forward (<= 1e-3 rel.).

Prints the table (family, input size, per engine: status) and one summary line per engine: converts / fp32 parity /
int8 agreement / clear refusals / crashes (out of the families MXNet can export). Each family runs in a fresh
process. Usage: ``python benchmarks/zoo_coverage.py [--families a,b] [--engines ncnn,onnx,tengine] [--jobs 1]
[--json out.json] [--messages]`` (all 37: tens of minutes on 2 cores)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.exporters.zoo_cases import BY_NAME, FAMILIES  # noqa: E402
from tests.exporters.zoo_check import ENGINES  # noqa: E402


def run_one(name: str, engines: tuple[str, ...]) -> dict:
    """One family in this (worker) process, in a scratch folder; the JSON-able result."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from tests.exporters.zoo_check import check_family

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as d:
        res = check_family(BY_NAME[name], d, engines).to_dict()
    res["seconds"] = time.perf_counter() - t
    return res


def cell(r: dict | None) -> str:
    """One engine's status on one family, in a few characters."""
    if r is None:
        return "-"
    s = r["status"]
    if s == "ok":
        text = "ok" if r["fp32_ok"] is not False else "fp32 FAIL"
    elif s == "fp32-mismatch":
        text = f"fp32 FAIL {r['fp32_error']:.1e}"
    elif s == "int8-mismatch":
        text = f"int8 FAIL {r['agreement']:.2f}" + ("" if r["fp32_ok"] is None else " (fp32 ok)")
    elif s == "refused":
        text = "refused" if _clear(r) else "refused (unclear)"
    elif s == "crashed":
        text = "CRASH"
    else:
        text = s
    if r.get("caffe") is not None and r["converted"]:
        text += " +caffe" if r["caffe"] else " -caffe"
    return text


def _clear(r: dict) -> bool:
    return r["status"] == "refused" and bool(r.get("names_node"))


def summary(results: list[dict], engine: str) -> str:
    targets = [fr for fr in results if fr["engines"].get(engine, {}).get("status") != "unexportable"]
    n = len(targets)  # a family whose case failed to build counts as not converted
    real = [fr["engines"][engine] for fr in targets if engine in fr["engines"]]
    conv = sum(r["converted"] for r in real)
    fp32 = sum(bool(r["fp32_ok"]) for r in real)
    int8 = sum(bool(r["int8_ok"]) for r in real)
    refused = sum(r["status"] == "refused" for r in real)
    clear = sum(_clear(r) for r in real)
    crashes = sum(r["status"] == "crashed" for r in real)
    caffe = sum(bool(r.get("caffe")) for r in real)
    fp32_txt = "n/a (int8-only export)" if engine == "tengine" else f"{fp32}/{n}"
    line = (f"{engine:<8} converts {conv}/{n}, fp32 parity {fp32_txt}, int8 agreement {int8}/{n}, "
            f"clear refusals {clear}/{refused}, crashes {crashes}")
    if engine == "ncnn":
        line += f", Caffe pair written {caffe}/{conv}"
    if engine == "tengine":  # verify --engine tengine: Tengine's runtime (when built) against the simulation
        exact = sum(r["converted"] and r.get("max_error_steps") == 0 for r in real)
        line += f", bit-exact {exact}/{conv}"
    return line


def table(results: list[dict], engines: tuple[str, ...]) -> str:
    w = max(len(fr["family"]) for fr in results)
    cols = {e: max([len(e)] + [len(cell(fr["engines"].get(e))) for fr in results]) for e in engines}
    head = f"{'family':<{w}}  size  " + "  ".join(f"{e:<{cols[e]}}" for e in engines) + "  seconds"
    lines = [head, "-" * len(head)]
    for fr in results:
        cells = ("build error: " + fr["error"]) if fr["error"] else "  ".join(
            f"{cell(fr['engines'].get(e)):<{cols[e]}}" for e in engines)
        lines.append(f"{fr['family']:<{w}}  {fr['size']:>4}  {cells}  {fr.get('seconds', 0):.0f}")
    return "\n".join(lines)


def known_refusal_drift(results: list[dict]) -> list[str]:
    """Where ``tests/exporters/test_zoo.py``'s KNOWN_REFUSALS no longer matches the measurement."""
    from tests.exporters.test_zoo import KNOWN_REFUSALS

    out = []
    for fr in results:
        for e, r in fr["engines"].items():
            known = KNOWN_REFUSALS.get((fr["family"], e))
            refused = r["status"] == "refused"
            if known is not None and not (refused and known in r["message"]):
                out.append(f"KNOWN_REFUSALS[{fr['family']!r}, {e!r}] is stale: now {r['status']}")
            elif known is None and refused:
                out.append(f"KNOWN_REFUSALS lacks ({fr['family']!r}, {e!r}): {r['message'][:160]}")
    return out


def messages(results: list[dict], engines: tuple[str, ...]) -> str:
    out = []
    for fr in results:
        for e in engines:
            r = fr["engines"].get(e)
            if r and r["status"] not in ("ok", "unexportable") and r["message"]:
                out.append(f"{fr['family']} [{e}] {r['status']}: {r['message'][:400]}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", help="comma-separated family names (default: all 37)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: ncnn,onnx,tengine")
    p.add_argument("--jobs", type=int, default=1, help="families checked at once (one process each)")
    p.add_argument("--json", dest="json_out", help="write the results as JSON to this path")
    p.add_argument("--messages", action="store_true", help="print every refusal/crash/mismatch message")
    a = p.parse_args(argv)
    names = a.families.split(",") if a.families else [f.name for f in FAMILIES]
    engines = tuple(a.engines.split(","))
    bad = [n for n in names if n not in BY_NAME] + [e for e in engines if e not in ENGINES]
    if bad:
        p.error(f"unknown family/engine: {', '.join(bad)} (families: {', '.join(BY_NAME)}; engines: "
                f"{', '.join(ENGINES)})")
    results: dict[str, dict] = {}
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        futures = {n: ex.submit(run_one, n, engines) for n in names}
        for n in names:
            try:
                results[n] = futures[n].result()
            except Exception as e:  # noqa: BLE001 - a worker killed (memory) is a crash of that family
                results[n] = {"family": n, "size": BY_NAME[n].size, "error": f"worker died: {e}", "engines": {}}
            fr = results[n]
            print(f"[{time.perf_counter() - t:6.0f}s] {n}: " + ", ".join(
                f"{e} {cell(fr['engines'].get(e))}" for e in engines) + (f" {fr['error']}" if fr["error"] else ""),
                file=sys.stderr, flush=True)
    ordered = [results[n] for n in names]
    print(table(ordered, engines))
    print()
    for e in engines:
        print(summary(ordered, e))
    for line in known_refusal_drift(ordered):
        print(line)
    if a.messages:
        print()
        print(messages(ordered, engines))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"engines": engines, "results": ordered}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
