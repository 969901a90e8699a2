"""Whole-or-absent exports (deployq.atomic): failed and killed exports, concurrency, unsafe names and folders,
per-file SHA-256 in the manifest, Ctrl-C in the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deployq.exporters.ncnn.export import write_all

import deployq.atomic
from deployq.atomic import MARKER, clean_stale, export_dir, safe_stem
from deployq.cli import main
from deployq.errors import DeployqError, InputError, UsageError
from deployq.manifest import manifest_bytes, read_manifest, sha256_folder

ROOT = Path(__file__).resolve().parents[1]

#: a child that starts an export, writes one file, says so, and waits to be killed
SLOW_WRITER = """
import sys, time
from pathlib import Path
from deployq.atomic import export_dir
with export_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.bin").write_bytes(b"new" * 100000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def _export(out: Path, payload: bytes) -> dict[str, bytes]:
    """A small export (two files and a manifest with their digests) through export_dir; returns its bytes."""
    with export_dir(out) as tmp:
        (tmp / "model.bin").write_bytes(payload)
        (tmp / "notes.txt").write_bytes(payload[:3] + b" notes")
        files = {"bin": "model.bin", "notes": "notes.txt"}
        (tmp / MARKER).write_bytes(manifest_bytes("ncnn", "m", (1, 3, 8, 8), files, {}, "test",
                                                  sha256_folder(tmp)))
    return _snapshot(out)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _others(out: Path) -> list[str]:
    """What lies next to ``out`` (temporary folders, set-aside exports, lock files)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_failed_export_leaves_the_previous_one(tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(RuntimeError, match="boom"), export_dir(out) as tmp:
        (tmp / "model.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not out.exists() and _others(out) == []  # a fresh --out stays absent
    before = _export(out, b"old model")
    with pytest.raises(KeyboardInterrupt), export_dir(out) as tmp:
        (tmp / "model.bin").write_bytes(b"half")
        raise KeyboardInterrupt
    assert _snapshot(out) == before and _others(out) == []
    after = _export(out, b"new model")
    assert after["model.bin"] == b"new model" and set(after) == set(before) and _others(out) == []
    assert read_manifest(out)["paths"]["bin"] == out / "model.bin"


def test_swap_without_rename_exchange(tmp_path, monkeypatch):
    """The fallback (set the old export aside, move the new one in) gives the same result; a run killed between
    the two renames is repaired by the next one: the set-aside export is moved back."""
    out = tmp_path / "exp"
    _export(out, b"v1")
    monkeypatch.setattr(deployq.atomic, "_rename_exchange", lambda a, b: False)
    assert _export(out, b"v2")["model.bin"] == b"v2" and _others(out) == []
    before = _snapshot(out)
    os.rename(out, tmp_path / f".exp.deployq-old-{_dead_pid()}-0a1b")
    stale = tmp_path / f".exp.deployq-tmp-{_dead_pid()}-0a1c"
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"v3, never finished")
    assert clean_stale(out) == [stale]
    assert _snapshot(out) == before and _others(out) == []


def test_sigkill_mid_write_then_next_export_cleans_up(tmp_path):
    out = tmp_path / "exp"
    before = _export(out, b"good export")
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        tmp = Path(child.stdout.readline().strip())
        assert tmp.name.startswith(f".exp.deployq-tmp-{child.pid}-") and (tmp / "model.bin").exists()
        with pytest.raises(DeployqError, match="another deployq export into this folder is running"):
            _export(out, b"concurrent")
        assert _snapshot(out) == before
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert _snapshot(out) == before and (read_manifest(out)["paths"]["bin"]).read_bytes() == b"good export"
    assert tmp.name in _others(out)  # left by the killed run ...
    after = _export(out, b"next export")
    assert after["model.bin"] == b"next export" and _others(out) == []  # ... and removed by the next one


def test_concurrent_export_in_one_process_is_refused(tmp_path):
    out = tmp_path / "exp"
    with export_dir(out) as tmp:
        (tmp / MARKER).write_text("{}")
        with pytest.raises(DeployqError, match=rf"{out}: another deployq export") as e, export_dir(out):
            pass
        assert e.value.exit_code == 3
    assert _snapshot(out) == {MARKER: b"{}"} and _others(out) == []


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "a\\b", "", "a b", "x\0y", "..", ".", "m\n"])
def test_unsafe_stems_are_refused(name):
    with pytest.raises(UsageError, match="not a plain name") as e:
        safe_stem(name)
    assert e.value.exit_code == 2 and e.value.where == "--name"


@pytest.mark.parametrize("name", ["resnet20", "mobilenet0.25", "m-int8", "my_net.v2"])
def test_plain_stems_pass(name):
    assert safe_stem(name) == name


def test_write_all_refuses_a_path_in_a_file_name(tmp_path):
    out = tmp_path / "a" / "out"
    with pytest.raises(UsageError, match="'../x.param'"):
        write_all({"param": b"7767517\n"}, out, {"param": "../x.param"})
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_cli_name_with_a_path_writes_nothing(tmp_path, capsys, how):
    out = tmp_path / "d1" / "d2" / "out"
    name = "../../x" if how == "relative" else str(tmp_path / "abs")
    assert main(["export-ncnn", "--model", "resnet20", "--name", name, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"deployq export-ncnn: error: --name: file name stem {name!r} is not a plain name (no path "
                   "separator, '..', NUL or whitespace; not empty) (give a stem such as 'resnet20' and choose "
                   "the folder with --out)")
    assert list(tmp_path.rglob("*")) == []


def test_unrelated_folder_and_file_are_refused(tmp_path, capsys):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(InputError, match=rf"{user}: a non-empty folder that is not a deployq export"):
        _export(user, b"m")
    assert _snapshot(user) == {"cat.jpg": b"\xff\xd8 not really"} and _others(user) == []
    file = tmp_path / "out.txt"
    file.write_text("keep")
    assert main(["export-ncnn", "--model", "resnet20", "--out", str(file)]) == 3
    assert capsys.readouterr().err.strip() == (f"deployq export-ncnn: error: {file}: exists and is not a folder "
                                               "(give a folder for --out)")
    assert file.read_text() == "keep"
    with pytest.raises(InputError, match="cannot create the parent folder"):
        _export(file / "sub" / "out", b"m")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match=rf"{ro}: cannot write in this folder"):
            _export(ro / "out", b"m")
    finally:
        ro.chmod(0o755)


def test_changed_file_is_detected(tmp_path, capsys):
    out = tmp_path / "exp"
    _export(out, b"model bytes")
    man = read_manifest(out)
    assert man["sha256"] == sha256_folder(out) and set(man["sha256"]) == {"model.bin", "notes.txt"}
    (out / "notes.txt").write_bytes(b"MOD notes")  # same size, other bytes
    with pytest.raises(InputError, match=r"export is not whole: notes.txt changed after export") as e:
        read_manifest(out)
    assert e.value.where == str(out / "notes.txt")
    assert main(["verify", str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deployq verify: error: {out / 'notes.txt'}: export is not whole") and "\n" not in err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """SIGINT while ``deployq calibrate resnet20`` works: exit 130, one line, no traceback, no scale file."""
    out = tmp_path / "s.json"
    code = ("import sys\nfrom deployq.cli import main\nprint('ready', flush=True)\n"
            f"sys.exit(main(['calibrate', 'resnet20', '--quiet', '--out', {str(out)!r}]))")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    native = "deployq: warning: deployq's native libraries were not built"  # (an install without a compiler)
    assert [ln for ln in err.strip().splitlines() if not ln.startswith(native)] == [
        "deployq calibrate: interrupted; nothing written"]
    assert not out.exists()


@pytest.mark.parametrize("exc,line,code", [
    (ZeroDivisionError("division by zero"), "deployq verify: internal error: ZeroDivisionError: division by zero "
     "(please report; DEPLOYQ_DEBUG=1 shows the traceback)", 1),
    (PermissionError(13, "Permission denied", "/data/x.npz"),
     "deployq verify: error: /data/x.npz: Permission denied", 1),
    (InputError("not a PNG", where="img/3.png", fix="remove it"), "deployq verify: error: img/3.png: not a PNG "
     "(remove it)", 3),
])
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, exc, line, code):
    import deployq.manifest

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(deployq.manifest, "read_manifest", broken)
    monkeypatch.delenv("DEPLOYQ_DEBUG", raising=False)
    assert main(["verify", str(tmp_path)]) == code
    assert capsys.readouterr().err.splitlines() == [line]
    if isinstance(exc, ZeroDivisionError):
        monkeypatch.setenv("DEPLOYQ_DEBUG", "1")
        with pytest.raises(ZeroDivisionError):
            main(["verify", str(tmp_path)])
