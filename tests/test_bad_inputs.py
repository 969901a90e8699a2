"""Bad and odd inputs to every command (issue 15): one case per rule of the input layer. Each case asserts the exit
code (deployq.errors: usage 2, bad input 3, verification breach 4), the one error line naming the file / layer /
tensor, no traceback, and what the output location holds afterwards (nothing new; an earlier file untouched).

The model is a tiny MXNet json/params pair (conv-BN-relu-conv-relu-pool-FC, 16x16 inputs) built here, the images
six generated PNGs; every command runs in-process (``deployq.cli.main``), a few through a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from deployq.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRE = ["--input-shape", "1,3,16,16", "--mean", "128", "--std", "64"]
NAMES = ("conv0", "bn0", "relu0", "conv1", "relu1", "pool0", "fc0")
ODD = ("conv 0#é", "bn=0", "relu 0", "conv1", "relu1", "pool0", "fc#0")


def tiny_model(d: Path, names: tuple[str, ...] = NAMES, var: list[float] | None = None) -> list[str]:
    """Write ``d/tiny-symbol.json`` + ``d/tiny-0000.params`` (random weights, seed 0); returns the CLI options."""
    d.mkdir(parents=True, exist_ok=True)
    c0, bn, r0, c1, r1, p0, fc = names
    rng = np.random.default_rng(0)
    x = mx.sym.Convolution(mx.sym.var("data"), num_filter=4, kernel=(3, 3), pad=(1, 1), name=c0)
    x = mx.sym.Activation(mx.sym.BatchNorm(x, name=bn, fix_gamma=False), act_type="relu", name=r0)
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1), name=c1)
    x = mx.sym.Activation(x, act_type="relu", name=r1)
    x = mx.sym.Pooling(x, global_pool=True, pool_type="avg", kernel=(1, 1), name=p0)
    x = mx.sym.FullyConnected(x, num_hidden=3, name=fc)
    shapes = dict(zip(x.list_arguments(), x.infer_shape(data=(1, 3, 16, 16))[0], strict=True))
    params = {f"arg:{k}": mx.nd.array(rng.normal(0, 0.3, s)) for k, s in shapes.items() if k != "data"}
    params[f"aux:{bn}_moving_mean"] = mx.nd.array(rng.normal(0, 0.1, 4))
    params[f"aux:{bn}_moving_var"] = mx.nd.array(var if var is not None else rng.uniform(0.5, 2, 4))
    x.save(str(d / "tiny-symbol.json"))
    mx.nd.save(str(d / "tiny-0000.params"), params)
    return ["--symbol", str(d / "tiny-symbol.json"), "--params", str(d / "tiny-0000.params"), *PRE]


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict:
    """The inputs: good and bad models, image folders, npz files, scale files, a saved net, an ncnn export."""
    d = tmp_path_factory.mktemp("bad")
    paths: dict = {"d": d, "sym": tiny_model(d / "tiny"), "neg": tiny_model(d / "neg", var=[1, -0.5, 1, 1]),
                   "odd": tiny_model(d / "odd", ODD)}
    for i in range(6):
        _png(d / "imgs" / f"c{i % 2}" / f"{i}.png", i)
    good = (d / "imgs" / "c0" / "0.png").read_bytes()
    for name, data in (("trunc", good[:len(good) // 2]), ("text", b"not an image\n"), ("zero", b"")):
        bad = d / name / "c0" / ("x.jpg" if name == "zero" else "x.png")
        bad.parent.mkdir(parents=True)
        bad.write_bytes(data)
        _png(d / name / "c1" / "ok.png", 9)
    x = np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype(np.float32)
    y = np.arange(6) % 2
    np.savez(d / "good.npz", x=x, y=y)
    np.savez(d / "nan.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 700, np.nan, x), y=y)
    np.savez(d / "inf.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 9, np.inf, x))
    np.savez(d / "empty.npz", x=x[:0], y=y[:0])
    np.savez(d / "labels.npz", x=np.concatenate([x, x[:2]]), y=y[:5])
    np.savez(d / "shape.npz", x=x[:, :, :8, :8])
    (d / "trunc.npz").write_bytes((d / "good.npz").read_bytes()[:300])
    sc = d / "s.json"
    assert main(["calibrate", *paths["sym"], "--data", str(d / "imgs"), "--method", "minmax", "--out", str(sc),
                 "--quiet"]) == 0
    s = json.loads(sc.read_text())

    def scale(name: str, edit) -> None:
        doc = json.loads(json.dumps(s))
        edit(doc)
        (d / name).write_text(json.dumps(doc))

    def entry(**kw):
        return lambda doc: doc["tensors"]["conv0:input"].update(kw)

    scale("s_zero.json", entry(threshold=0.0, step=0.0))
    scale("s_neg.json", entry(threshold=-2.0))
    scale("s_big.json", entry(threshold=1e30, step=1e30 / 127))
    scale("s_tiny.json", entry(threshold=1e-38, step=1e-38 / 127))
    scale("s_ratio.json", entry(threshold=5e4, step=5e4 / 127, observed_min=-0.01, observed_max=0.01))
    scale("s_empty.json", lambda doc: doc.update(tensors={}))
    scale("s_part.json", lambda doc: doc["tensors"].pop("conv1:input"))
    scale("s_other.json", lambda doc: doc["model"].update(fingerprint="sha256:0123456789abcdef"))
    (d / "s_text.json").write_text("{ not json")
    (d / "cfg_dict.json").write_text('{"op_types": ["Conv2D"]}')
    sym = json.loads((d / "tiny" / "tiny-symbol.json").read_text())
    sym["nodes"][-1]["inputs"][0] = [999, 0, 0]
    (d / "dangling-symbol.json").write_text(json.dumps(sym))
    params = (d / "tiny" / "tiny-0000.params").read_bytes()
    (d / "trunc-0000.params").write_bytes(params[:len(params) // 2])
    assert main(["export-ncnn", *paths["sym"], "--scales", str(sc), "--out", str(d / "ncnn")]) == 0
    assert main(["qat", *paths["sym"], "--data", str(d / "imgs"), "--epochs", "1", "--batch-size", "6",
                 "--calib-images", "6", "--out", str(d / "q" / "tiny"), "--quiet"]) == 0
    return paths


def _sub(text: str, w: dict, out: Path) -> str:
    return text.replace("{d}", str(w["d"])).replace("{o}", str(out))


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """(exit code, the one error line); asserts that stderr holds exactly one error line and no traceback."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"deployq {argv[0]}: error: "), lines[0]
    return code, lines[0]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# (id, argv with {d} = the inputs' folder and {o} = a fresh output folder, exit code, message regex ({d} too))
SYM, NEG, ODDM = "@sym", "@neg", "@odd"
CASES = [
    # images and npz files (calibrate, verify, sensitivity, qat, export-tengine/onnx --data)
    ("calibrate-truncated-png", ["calibrate", SYM, "--data", "{d}/trunc", "--out", "{o}/s.json"], 3,
     r"{d}/trunc/c0/x.png: cannot decode image .*--skip-bad-images"),
    ("calibrate-text-as-png", ["calibrate", SYM, "--data", "{d}/text", "--out", "{o}/s.json"], 3,
     r"{d}/text/c0/x.png: cannot decode image \(UnidentifiedImageError"),
    ("calibrate-zero-byte-jpg", ["calibrate", SYM, "--data", "{d}/zero", "--out", "{o}/s.json"], 3,
     r"{d}/zero/c0/x.jpg: cannot decode image"),
    ("calibrate-truncated-npz", ["calibrate", SYM, "--data", "{d}/trunc.npz", "--out", "{o}/s.json"], 3,
     r"{d}/trunc.npz: not a readable .npz"),
    ("calibrate-labels-mismatch", ["calibrate", SYM, "--data", "{d}/labels.npz", "--out", "{o}/s.json"], 3,
     r"{d}/labels.npz: labels 'y' must be 8 integers \(one per image\), got shape \(5,\)"),
    ("calibrate-nan-images", ["calibrate", SYM, "--data", "{d}/nan.npz", "--out", "{o}/s.json"], 3,
     r"{d}/nan.npz: images hold NaN or Inf values \(first at image 0\)"),
    ("calibrate-npz-wrong-shape", ["calibrate", SYM, "--data", "{d}/shape.npz", "--out", "{o}/s.json"], 3,
     r"{d}/shape.npz: images have shape \(6, 3, 8, 8\); the net takes N x 3x16x16"),
    ("calibrate-no-such-data", ["calibrate", SYM, "--data", "{d}/nowhere", "--out", "{o}/s.json"], 3,
     r"{d}/nowhere: no such file or folder"),
    ("verify-nan-images", ["verify", "{d}/ncnn", "--data", "{d}/nan.npz"], 3,
     r"{d}/nan.npz: images hold NaN or Inf values"),
    ("verify-inf-images", ["verify", "{d}/ncnn", "--data", "{d}/inf.npz"], 3,
     r"{d}/inf.npz: images hold NaN or Inf values \(first at image 0\)"),
    ("verify-empty-npz", ["verify", "{d}/ncnn", "--data", "{d}/empty.npz"], 3, r"{d}/empty.npz: holds no images"),
    ("verify-text-as-png", ["verify", "{d}/ncnn", "--data", "{d}/text"], 3, r"{d}/text/c0/x.png: cannot decode"),
    ("verify-truncated-npz", ["verify", "{d}/ncnn", "--data", "{d}/trunc.npz"], 3, r"{d}/trunc.npz: not a readable"),
    ("sensitivity-truncated-png", ["sensitivity", SYM, "--data", "{d}/trunc", "-o", "{o}/sens"], 3,
     r"{d}/trunc/c0/x.png: cannot decode image"),
    ("qat-labels-mismatch", ["qat", SYM, "--data", "{d}/labels.npz", "--out", "{o}/q"], 3,
     r"{d}/labels.npz: labels 'y' must be 8 integers"),
    ("export-tengine-nan-images", ["export-tengine", SYM, "--data", "{d}/nan.npz", "--out", "{o}/tg"], 3,
     r"{d}/nan.npz: images hold NaN or Inf"),
    # models: BatchNorm variance, corrupt files
    ("calibrate-negative-bn-var", ["calibrate", NEG, "--data", "{d}/imgs", "--out", "{o}/s.json"], 3,
     r"{d}/neg/tiny-0000.params: BatchNorm layer 'bn0': moving_var is negative \(-0.5 at channel 1, 1 of 4"),
    ("export-ncnn-negative-bn-var", ["export-ncnn", NEG, "--scales", "{d}/s.json", "--out", "{o}/n"], 3,
     r"{d}/neg/tiny-0000.params: BatchNorm layer 'bn0': moving_var is negative"),
    ("export-tengine-negative-bn-var", ["export-tengine", NEG, "--data", "{d}/imgs", "--out", "{o}/tg"], 3,
     r"{d}/neg/tiny-0000.params: BatchNorm layer 'bn0': moving_var is negative"),
    ("export-onnx-negative-bn-var", ["export-onnx", NEG, "--scales", "{d}/s.json", "--out", "{o}/on"], 3,
     r"BatchNorm layer 'bn0': moving_var is negative"),
    ("export-tengine-dangling-input", ["export-tengine", "--symbol", "{d}/dangling-symbol.json", "--params",
                                       "{d}/tiny/tiny-0000.params", *PRE, "--data", "{d}/imgs", "--out", "{o}/tg"],
     3, r"{d}/dangling-symbol.json"),
    ("export-tengine-truncated-params", ["export-tengine", "--symbol", "{d}/tiny/tiny-symbol.json", "--params",
                                         "{d}/trunc-0000.params", *PRE, "--data", "{d}/imgs", "--out", "{o}/tg"],
     3, r"{d}/trunc-0000.params"),
    # scale files: values, coverage, wrong model, not JSON
    ("export-ncnn-threshold-zero", ["export-ncnn", SYM, "--scales", "{d}/s_zero.json", "--out", "{o}/n"], 3,
     r"{d}/s_zero.json: tensor 'conv0:input': threshold 0.0 is not a positive finite number"),
    ("export-ncnn-threshold-negative", ["export-ncnn", SYM, "--scales", "{d}/s_neg.json", "--out", "{o}/n"], 3,
     r"{d}/s_neg.json: tensor 'conv0:input': field 'threshold' must be >= 0, got -2.0"),
    ("export-ncnn-threshold-huge", ["export-ncnn", SYM, "--scales", "{d}/s_big.json", "--out", "{o}/n"], 3,
     r"{d}/s_big.json: tensor 'conv0:input': threshold 1e\+30 is implausible"),
    ("export-tengine-threshold-huge", ["export-tengine", SYM, "--scales", "{d}/s_big.json", "--data", "{d}/imgs",
                                       "--out", "{o}/tg"], 3, r"{d}/s_big.json: tensor 'conv0:input': threshold 1e"),
    ("export-onnx-threshold-tiny", ["export-onnx", SYM, "--scales", "{d}/s_tiny.json", "--out", "{o}/on"], 3,
     r"{d}/s_tiny.json: tensor 'conv0:input': threshold 1e-38 is implausible"),
    ("export-ncnn-threshold-vs-observed", ["export-ncnn", SYM, "--scales", "{d}/s_ratio.json", "--out", "{o}/n"], 3,
     r"{d}/s_ratio.json: tensor 'conv0:input': threshold 50000 is implausible: over 1e\+06 x the observed max"),
    ("export-ncnn-no-tensors", ["export-ncnn", SYM, "--scales", "{d}/s_empty.json", "--out", "{o}/n"], 3,
     r"{d}/s_empty.json: the scale file holds no tensors"),
    ("export-tengine-no-tensors", ["export-tengine", SYM, "--scales", "{d}/s_empty.json", "--out", "{o}/tg"], 3,
     r"{d}/s_empty.json: the scale file holds no tensors"),
    ("export-onnx-other-model", ["export-onnx", SYM, "--scales", "{d}/s_other.json", "--out", "{o}/on"], 3,
     r"calibrated for a different model"),
    ("export-ncnn-scales-not-json", ["export-ncnn", SYM, "--scales", "{d}/s_text.json", "--out", "{o}/n"], 3,
     r"{d}/s_text.json: not valid JSON"),
    ("export-ncnn-config-not-a-list", ["export-ncnn", SYM, "--scales", "{d}/s.json", "--config", "{d}/cfg_dict.json",
                                     "--out", "{o}/n"], 3, r"{d}/cfg_dict.json"),
    # options: input shape, names, output folders
    ("calibrate-input-shape-zero", ["calibrate", SYM, "--input-shape", "1,3,0,16", "--data", "{d}/imgs",
                                    "--out", "{o}/s.json"], 2, r"--input-shape must be N,C,H,W \(four positive"),
    ("export-tengine-input-shape-huge", ["export-tengine", SYM, "--input-shape", "1,3,60000,60000", "--data",
                                         "{d}/imgs", "--out", "{o}/tg"], 2,
     r"--input-shape 1,3,60000,60000: a side above 8192 pixels"),
    ("export-onnx-input-shape-elements", ["export-onnx", SYM, "--input-shape", "64,3,8192,8192", "--scales",
                                          "{d}/s.json", "--out", "{o}/on"], 2,
     r"--input-shape 64,3,8192,8192: 12,884,901,888 values in one input"),
    ("export-ncnn-input-shape-text", ["export-ncnn", SYM, "--input-shape", "1,3,a,16", "--scales", "{d}/s.json",
                                      "--out", "{o}/n"], 2, r"--input-shape must be N,C,H,W"),
    ("export-tengine-name-with-path", ["export-tengine", SYM, "--name", "../x", "--data", "{d}/imgs",
                                       "--out", "{o}/tg"], 2, r"--name: file name stem '../x' is not a plain name"),
    ("export-ncnn-name-absolute", ["export-ncnn", SYM, "--name", "{o}/abs", "--scales", "{d}/s.json",
                                   "--out", "{o}/n"], 2, r"--name: file name stem '{o}/abs' is not a plain name"),
    ("export-onnx-no-scales", ["export-onnx", SYM, "--out", "{o}/on"], 2, r"no --scales: the fp32 model tiny"),
    ("sensitivity-unknown-layer", ["sensitivity", SYM, "--data", "{d}/imgs", "--layers", "nope", "-o", "{o}/s"], 2,
     r"--layers: unknown layer\(s\) \['nope'\]"),
    ("qat-nan-images", ["qat", SYM, "--data", "{d}/nan.npz", "--out", "{o}/q"], 3, r"{d}/nan.npz"),
    ("verify-not-an-export", ["verify", "{d}/imgs"], 3, r"{d}/imgs: no deployq-export.json"),
]


def _argv(case: list[str], w: dict, out: Path) -> list[str]:
    argv: list[str] = []
    for a in case:
        argv += w[a[1:]] if a in (SYM, NEG, ODDM) else [_sub(a, w, out)]
    return argv


@pytest.mark.parametrize("argv,code,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(w, tmp_path, capsys, argv, code, pattern):
    """Exit code, one line naming the file / layer / tensor, and nothing written in the output folder."""
    out = tmp_path / "out"
    out.mkdir()
    got, line = run(capsys, _argv(argv, w, out))
    assert got == code, line
    assert re.search(_sub(pattern, w, out).replace(str(w["d"]), re.escape(str(w["d"]))), line), line
    assert _files(out) == []


# ------------------------------------------------------------------------------------ output folders and states

@pytest.mark.parametrize("cmd", ["export-ncnn", "export-tengine", "export-onnx"])
def test_out_is_a_file_or_a_foreign_folder(w, tmp_path, capsys, cmd):
    """Refused before any work (the model named is not even read): the file / folder is left as it was."""
    file = tmp_path / "out.txt"
    file.write_text("keep")
    missing = ["--symbol", str(tmp_path / "missing.json"), "--params", str(tmp_path / "missing.params"), *PRE]
    code, line = run(capsys, [cmd, *missing, "--scales", str(w["d"] / "s.json"), "--out", str(file)])
    assert code == 3 and line.endswith(f"{file}: exists and is not a folder (give a folder for --out)")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    code, line = run(capsys, [cmd, *missing, "--scales", str(w["d"] / "s.json"), "--out", str(photos)])
    assert code == 3 and f"{photos}: a non-empty folder that is not a deployq export" in line
    assert file.read_text() == "keep" and _files(photos) == ["cat.jpg"] and len(_files(tmp_path)) == 3


def test_failed_reexport_keeps_the_previous_export(w, tmp_path, capsys):
    out = tmp_path / "n"
    assert main(["export-ncnn", *w["sym"], "--scales", str(w["d"] / "s.json"), "--out", str(out)]) == 0
    before = {p: (out / p).read_bytes() for p in _files(out)}
    code, line = run(capsys, ["export-ncnn", *w["sym"], "--scales", str(w["d"] / "s_zero.json"), "--out", str(out)])
    assert code == 3 and "threshold 0.0" in line
    assert {p: (out / p).read_bytes() for p in _files(out)} == before and _files(tmp_path) == ["n", *[
        f"n/{p}" for p in before]]


def test_partial_scale_file_says_which_layers_stay_fp32(w, tmp_path, capsys):
    out = tmp_path / "n"
    capsys.readouterr()
    assert main(["export-ncnn", *w["sym"], "--scales", str(w["d"] / "s_part.json"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"deployq export-ncnn: warning: {w['d'] / 's_part.json'}: no input range for 1 Conv/FC layer(s), kept "
            "in fp32: conv1") in err
    table = (out / "tiny.table").read_text()
    assert "conv0 " in table and "fc0 " in table and "conv1 " not in table
    conv1 = next(ln for ln in (out / "tiny-int8.param").read_text().splitlines() if " conv1 " in ln)
    assert " 8=" not in conv1  # no int8 scale term: fp32


# ------------------------------------------------------------------------------------------- exit code 4

def test_verify_breach_is_exit_4(w, capsys):
    capsys.readouterr()
    assert main(["verify", str(w["d"] / "ncnn"), "--data", str(w["d"] / "good.npz"), "--no-layers",
                 "--min-agreement", "1.01"]) == 4
    assert "FAILED" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- saved nets

def test_saved_net_naming_another_model(w, tmp_path, capsys):
    q = tmp_path / "q"
    meta = json.loads((w["d"] / "q" / "tiny.deployq.json").read_text())
    meta["architecture"] = {"kind": "builtin", "name": "resnet20"} if isinstance(meta["architecture"], dict) else "x"
    (tmp_path / "q.deployq.json").write_text(json.dumps(meta))
    (tmp_path / "q.params").write_bytes((w["d"] / "q" / "tiny.params").read_bytes())
    for cmd in ("export-ncnn", "export-onnx", "export-tengine"):
        code, line = run(capsys, [cmd, "--qnet", str(q), "--out", str(tmp_path / "out")])
        assert code == 3 and str(tmp_path / "q.") in line, line
    assert not (tmp_path / "out").exists()


def test_truncated_saved_net(w, tmp_path, capsys):
    data = (w["d"] / "q" / "tiny.params").read_bytes()
    (tmp_path / "q.params").write_bytes(data[:len(data) // 3])
    (tmp_path / "q.deployq.json").write_bytes((w["d"] / "q" / "tiny.deployq.json").read_bytes())
    code, line = run(capsys, ["export-onnx", "--qnet", str(tmp_path / "q"), "--out", str(tmp_path / "out")])
    assert code == 3 and f"{tmp_path / 'q.params'}: " in line
    (tmp_path / "q.deployq.json").write_text("{ broken")
    code, line = run(capsys, ["export-ncnn", "--qnet", str(tmp_path / "q"), "--out", str(tmp_path / "out")])
    assert code == 3 and f"{tmp_path / 'q.deployq.json'}" in line
    assert not (tmp_path / "out").exists()


def test_broken_manifest(w, tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "deployq-export.json").write_text("[1, 2")
    code, line = run(capsys, ["verify", str(exp)])
    assert code == 3 and f"{exp / 'deployq-export.json'}: not valid JSON" in line


# --------------------------------------------------------------------------------------- unsafe names

def test_unsafe_names_ncnn(w, tmp_path, capsys):
    """Layer names with a space, '#', '=' and a non-ASCII letter: the .param and .table files get safe names,
    the same in both, the manifest maps them, and ncnn loads and runs the export (verify passes)."""
    out, sc = tmp_path / "n", tmp_path / "s.json"
    assert main(["calibrate", *w["odd"], "--data", str(w["d"] / "imgs"), "--method", "minmax", "--out", str(sc),
                 "--quiet"]) == 0
    assert main(["export-ncnn", *w["odd"], "--scales", str(sc), "--out", str(out)]) == 0
    man = json.loads((out / "deployq-export.json").read_text())
    m = man["safe_names"]
    assert m["conv 0#é"] == "conv_0__" and m["relu 0"] == "relu_0" and m["fc#0"] == "fc_0" and m["bn=0"] == "bn_0"
    for f in ("tiny-int8.param", "tiny.param", "tiny.table"):
        text = (out / f).read_text()
        assert text.isascii() and not any(n in text for n in ("conv 0", "fc#0", "relu 0")), f
    table = dict(ln.split(" ", 1) for ln in (out / "tiny.table").read_text().splitlines())
    param = (out / "tiny-int8.param").read_text().split()
    assert {"conv_0___param_0", "conv_0__", "fc_0"} <= set(table) and {"conv_0__", "fc_0", "relu_0"} <= set(param)
    capsys.readouterr()
    assert main(["verify", str(out), "--data", str(w["d"] / "good.npz")]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_unsafe_names_tengine(w, tmp_path, capsys):
    out = tmp_path / "tg"
    assert main(["export-tengine", *w["odd"], "--data", str(w["d"] / "imgs"), "--out", str(out)]) == 0
    lines = (out / "tiny.scale").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["data", "conv_0__", "conv1", "pool0", "fc_0"]
    assert all(len(ln.split()) == 3 and ln.isascii() for ln in lines)
    sym = json.loads((out / "tiny-symbol.json").read_text())
    assert {"conv_0__", "fc_0"} <= {n["name"] for n in sym["nodes"]}
    assert json.loads((out / "deployq-export.json").read_text())["safe_names"]["conv 0#é"] == "conv_0__"
    capsys.readouterr()
    assert main(["verify", str(out), "--data", str(w["d"] / "good.npz")]) == 0


def test_input_shape_applies_to_export_tengine_symbol(w, tmp_path):
    """--input-shape is applied (not ignored) on export-tengine --symbol: the manifest and the calibration use it."""
    out = tmp_path / "tg"
    argv = [a if a != "1,3,16,16" else "1,3,24,24" for a in w["sym"]]
    assert main(["export-tengine", *argv, "--data", str(w["d"] / "imgs"), "--out", str(out)]) == 0
    assert json.loads((out / "deployq-export.json").read_text())["input"]["shape"] == [1, 3, 24, 24]


# ------------------------------------------------------------------------------------ through a subprocess

SUBPROCESS_CASES = [
    (["verify", "{d}/ncnn", "--data", "{d}/text"], 3, r"{d}/text/c0/x.png: cannot decode image"),
    (["export-tengine", SYM, "--scales", "{d}/s_zero.json", "--data", "{d}/imgs", "--out", "{o}/tg"], 3,
     r"{d}/s_zero.json: tensor 'conv0:input': threshold 0.0"),
]


def test_real_process_prints_one_line(w, tmp_path):
    """The entry point ``python -m deployq.cli`` (two cases, run side by side): exit code, exactly one stderr line
    besides notes and progress bars, no traceback, nothing in the output folder."""
    runs = []
    for k, (argv, code, pattern) in enumerate(SUBPROCESS_CASES):
        out = tmp_path / f"out{k}"
        out.mkdir()
        child = subprocess.Popen([sys.executable, "-m", "deployq.cli", *_argv(argv, w, out)], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
        runs.append((child, out, code, pattern))
    for child, out, code, pattern in runs:
        _, err = child.communicate(timeout=180)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("deployq: note", "deployq: warning",
                                                                                    "[")) and "img/s]" not in ln]
        assert child.returncode == code and "Traceback" not in err, err
        assert len(lines) == 1 and re.search(_sub(pattern, w, out).replace(str(w["d"]), re.escape(str(w["d"]))),
                                             lines[0]), err
        assert _files(out) == []
