"""Fault injection through the real exporters (issue 15): ``deployq export-ncnn / export-tengine / export-onnx`` is
stopped by SIGKILL or SIGINT at a chosen point of an export into a folder that holds an earlier export; afterwards the
folder holds the old export or the new one, whole (its manifest's SHA-256 of every file match), and the next export
removes what the killed run left beside it. (tests/test_atomic.py covers deployq.atomic itself with a synthetic
writer, concurrency and the fallback swap.)

Points: ``writing`` (after the first file lands in the temporary folder), ``before-swap`` (every file written, before
the swap) and ``swapped`` (the new export moved in, the previous one not yet removed; signals are blocked there, so
only SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deployq.cli import main
from deployq.manifest import read_manifest
from tests.test_bad_inputs import tiny_model

ROOT = Path(__file__).resolve().parents[1]

#: runs ``deployq.cli.main(argv)`` with a pause (and a line "paused" on stdout) at the point argv[1]
CHILD = r"""
import pathlib, sys, time
import deployq.atomic as A
from deployq.cli import main

point, argv = sys.argv[1], sys.argv[2:]

def pause():
    print("paused", flush=True)
    time.sleep(300)

if point == "writing":
    for meth in ("write_bytes", "write_text"):
        real_write = getattr(pathlib.Path, meth)
        def write(self, data, *a, _real=real_write, **k):
            n = _real(self, data, *a, **k)
            if A.TMP_TAG in self.parent.name:
                pause()
            return n
        setattr(pathlib.Path, meth, write)
elif point == "before-swap":
    real_commit = A._commit
    A._commit = lambda tmp, out: (pause(), real_commit(tmp, out))
elif point == "swapped":
    real_exchange = A._rename_exchange
    def exchange(a, b):
        done = real_exchange(a, b)
        if done:
            pause()
        return done
    A._rename_exchange = exchange
sys.exit(main(argv))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tiny json/params model, its scale file, and the export commands of each engine (without --out)."""
    d = tmp_path_factory.mktemp("faults")
    from tests.test_bad_inputs import _png

    for i in range(4):
        _png(d / "imgs" / f"{i}.png", i)
    sym = tiny_model(d / "m")
    sc = d / "s.json"
    assert main(["calibrate", *sym, "--data", str(d / "imgs"), "--method", "minmax", "--out", str(sc),
                 "--quiet"]) == 0
    sc_other = d / "s2.json"  # another calibration: a new export that differs from the old one
    assert main(["calibrate", *sym, "--data", str(d / "imgs" / "0.png"), "--method", "minmax", "--out",
                 str(sc_other), "--quiet"]) == 0
    return {"ncnn": ["export-ncnn", *sym, "--scales"], "onnx": ["export-onnx", *sym, "--scales"],
            "tengine": ["export-tengine", *sym, "--data", str(d / "imgs"), "--scales"], "old": str(sc),
            "new": str(sc_other)}


def _state(out: Path) -> dict[str, bytes]:
    """Every file of the export, after checking that it is whole (read_manifest checks each file's SHA-256)."""
    man = read_manifest(out)
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert set(man["sha256"]) | {"deployq-export.json"} == set(files)
    return files


CASES = [("ncnn", "writing", signal.SIGKILL), ("ncnn", "before-swap", signal.SIGINT),
         ("ncnn", "swapped", signal.SIGKILL), ("tengine", "writing", signal.SIGINT),
         ("onnx", "before-swap", signal.SIGKILL)]


@pytest.mark.slow
def test_killed_exports_leave_old_or_new_whole(inputs, tmp_path):
    """All cases side by side (one child process each): the old export, or (killed after the swap) the new one,
    whole; SIGINT exits 130 with one line; the next export into the folder leaves nothing beside it."""
    runs = []
    for engine, point, sig in CASES:
        out = tmp_path / f"{engine}-{point}" / "exp"
        assert main([*inputs[engine], inputs["old"], "--out", str(out)]) == 0
        old = _state(out)
        child = subprocess.Popen([sys.executable, "-c", CHILD, point, *inputs[engine], inputs["new"], "--out",
                                  str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
        runs.append((engine, point, sig, out, old, child))
    for engine, point, sig, out, old, child in runs:
        case = f"{engine} {point} {sig.name}"
        assert child.stdout.readline().strip() == "paused", case
        child.send_signal(sig)
        _, err = child.communicate(timeout=120)
        now = _state(out)
        if point == "swapped":
            assert now != old and now["deployq-export.json"] != old["deployq-export.json"], case
            assert any(".deployq-tmp-" in p.name for p in out.parent.iterdir()), case  # the old one, set aside
        else:
            assert now == old, case
        if sig == signal.SIGINT:
            assert child.returncode == 130, (case, err)
            assert [ln for ln in err.splitlines() if "deployq" in ln and "interrupted" in ln] == [
                f"deployq {inputs[engine][0]}: interrupted; nothing written"], err
            assert "Traceback" not in err and sorted(p.name for p in out.parent.iterdir()) == ["exp"], case
        else:
            assert child.returncode == -signal.SIGKILL, case
        assert main([*inputs[engine], inputs["new"], "--out", str(out)]) == 0, case
        new = _state(out)
        assert sorted(p.name for p in out.parent.iterdir()) == ["exp"], case  # the killed run's leftovers removed
        if point == "swapped":
            assert new == now, case  # the killed run had finished the same export
