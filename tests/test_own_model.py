"""A user's own model through the CLI only: json/params or a gluoncv name, an image folder, calibrate -> export-ncnn /
export-tengine / export-onnx -> verify, qat -> --qnet, reload of a saved 1000-class net, and the error paths."""

from __future__ import annotations

import json

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon
from mxnet.gluon import nn
from PIL import Image

from deployq.cli import main

SHAPE = "1,3,48,48"
PRE = ["--input-shape", SHAPE, "--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375", "--resize", "56"]


class TinyNet(gluon.HybridBlock):
    """A custom HybridBlock that is not a gluoncv model: conv-bn-relu, a residual add, global pooling, dense."""

    def __init__(self, classes: int = 1000, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.c1 = nn.Conv2D(8, 3, padding=1, use_bias=False)
            self.b1 = nn.BatchNorm()
            self.c2 = nn.Conv2D(8, 3, padding=1)
            self.pool = nn.GlobalAvgPool2D()
            self.fc = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(y + self.c2(y))
        return self.fc(F.flatten(self.pool(y)))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    for c in range(3):  # class subfolders, JPEG and PNG, different sizes, a gray and an RGBA image
        (d / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            h, w = (int(v) for v in rng.integers(50, 90, 2))
            a = np.clip(rng.integers(0, 255, 3) + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(a)
            img = img.convert("L") if i == 4 else img.convert("RGBA") if i == 5 else img
            img.save(d / "imgs" / f"c{c}" / f"{i}.{'jpg' if i % 2 == 0 and i != 4 else 'png'}")
    mx.random.seed(1)
    net = TinyNet()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 48, 48)))
    for p in net.collect_params().values():  # non-trivial BatchNorm statistics
        if p.name.endswith(("running_mean", "beta")):
            p.set_data(mx.nd.array(rng.normal(0, 0.2, p.shape)))
        elif p.name.endswith(("running_var", "gamma")):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, p.shape)))
    net.export(str(d / "tiny"))
    return d


def _model(work):
    return ["--symbol", str(work / "tiny-symbol.json"), "--params", str(work / "tiny-0000.params")]


def _verify(export, work, capsys, *extra):
    capsys.readouterr()
    assert main(["verify", str(export), "--data", str(work / "imgs"), "--json", *extra]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["images"] == 18 and "accuracy" in rep  # class subfolders: labelled
    assert rep["agreement_sim_ties"] >= 0.99 and rep["max_error_steps"] <= 1.0
    return rep


def test_symbol_ptq_ncnn_onnx_tengine(work, capsys):
    sc = work / "scales.json"
    capsys.readouterr()
    assert main(["calibrate", *_model(work), *PRE, "--data", str(work / "imgs"), "--method", "kl",
                 "--out", str(sc), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    doc = json.loads(sc.read_text())
    assert summary["images"] == 18 and summary["thresholds"] == {k: v["threshold"] for k, v in doc["tensors"].items()}
    assert doc["preprocess"]["mean"] == [123.675, 116.28, 103.53] and doc["preprocess"]["resize"] == 56
    # the scale file carries the input shape and preprocessing: no --input-shape needed later
    assert main(["export-ncnn", *_model(work), "--scales", str(sc), "--out", str(work / "ncnn"), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert {k: open(v, "rb").read() for k, v in files.items()}  # every file listed exists
    man = json.loads((work / "ncnn" / "deployq-export.json").read_text())
    assert man["input"]["shape"] == [1, 3, 48, 48]
    assert man["preprocess"]["ncnn"]["norm_vals"] == pytest.approx([1 / 58.395, 1 / 57.12, 1 / 57.375])
    usage = (work / "ncnn" / "USAGE.txt").read_text()
    assert "substract_mean_normalize" in usage and "shape=[48,48,3] pixel=RGB" in usage
    _verify(work / "ncnn", work, capsys)

    sco = work / "scales-onnx.json"
    assert main(["calibrate", *_model(work), *PRE, "--data", str(work / "imgs"), "--profile", "onnx",
                 "--method", "minmax", "--out", str(sco), "--quiet"]) == 0
    assert main(["export-onnx", *_model(work), "--scales", str(sco), "--data", str(work / "imgs"),
                 "-o", str(work / "onnx")]) == 0
    _verify(work / "onnx", work, capsys, "--no-layers")

    # Tengine needs every tensor's range: without --data it says so; with it, the other tensors are calibrated
    assert main(["export-tengine", *_model(work), "--scales", str(sc), "--out", str(work / "tg")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["export-tengine", *_model(work), "--scales", str(sc), "--data", str(work / "imgs"),
                 "--out", str(work / "tg")]) == 0
    rep = _verify(work / "tg", work, capsys)  # Tengine's arithmetic (NumPy model of its kernels) vs the simulation
    assert rep["engine"] == "tengine" and rep["max_error_steps"] <= 1.0
    tman = json.loads((work / "tg" / "deployq-export.json").read_text())
    assert tman["preprocess"]["tengine"] == {"-g": "3,48,48", "-w": "123.675,116.28,103.53",
                                             "-s": "0.0171247538,0.0175070028,0.0174291939", "-b": 1, "-c": 0,
                                             "exact_crop": False}


def test_preprocess_reproduces_fp32_in_ncnn(work):
    """The USAGE/manifest values applied by hand (NumPy resize/crop + ncnn's substract_mean_normalize) give the
    fp32 model's outputs in ncnn's runtime."""
    import ncnn

    from deployq.preprocess import Preprocess

    man = json.loads((work / "ncnn" / "deployq-export.json").read_text())
    pre = Preprocess.from_dict(man["preprocess"])
    img = Image.open(next((work / "imgs" / "c0").glob("0.jpg"))).convert("RGB")
    pix = np.ascontiguousarray(pre.pixels(img))  # resized + cropped uint8 HxWx3, rgb
    m = ncnn.Mat.from_pixels(pix, ncnn.Mat.PixelType.PIXEL_RGB, pre.width, pre.height)
    m.substract_mean_normalize(man["preprocess"]["ncnn"]["mean_vals"], man["preprocess"]["ncnn"]["norm_vals"])
    net = ncnn.Net()
    net.load_param(str(work / "ncnn" / "tiny.param"))
    net.load_model(str(work / "ncnn" / "tiny.bin"))
    ex = net.create_extractor()
    ex.input("data", m)
    _, out = ex.extract(net.output_names()[0])
    sb = gluon.SymbolBlock.imports(str(work / "tiny-symbol.json"), ["data"], str(work / "tiny-0000.params"))
    x = (pix.astype(np.float32) - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    ref = sb(mx.nd.array(x.transpose(2, 0, 1)[None])).asnumpy().ravel()
    got = np.array(out).ravel()
    assert got.shape == ref.shape == (1000,)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max() + 1e-5


def test_qat_then_every_export(work, capsys):
    q = work / "q" / "tiny-qat"
    assert main(["qat", *_model(work), *PRE, "--data", str(work / "imgs"), "--val", str(work / "imgs"),
                 "--epochs", "1", "--batch-size", "6", "--out", str(q), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and len(summary["history"]) == 1 and np.isfinite(summary["history"][0]["loss"])
    meta = json.loads((work / "q" / "tiny-qat.deployq.json").read_text())
    assert meta["architecture"]["kind"] == "symbol" and meta["preprocess"]["resize"] == 56
    # --resume continues from the checkpoint for a second epoch
    assert main(["qat", "--data", str(work / "imgs"), "--epochs", "2", "--batch-size", "6", "--out", str(q),
                 "--resume", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 6
    assert main(["export-ncnn", "--qnet", str(q), "--out", str(work / "qncnn")]) == 0
    _verify(work / "qncnn", work, capsys)
    assert main(["export-onnx", "--qnet", str(q), "-o", str(work / "qonnx")]) == 0
    _verify(work / "qonnx", work, capsys, "--no-layers")
    assert main(["calibrate", "--qnet", str(q), "--data", str(work / "imgs"), "--out", str(work / "qs.json"),
                 "--quiet"]) == 0


def test_gluoncv_1000_class_qnet_reloads(tmp_path):
    """A saved 1000-class gluoncv net reloads (rebuilt by name and class count) with identical outputs."""
    import deployq

    net = deployq.zoo.get_model("resnet18_v1", classes=1000)
    net.initialize(mx.init.Xavier())
    x = mx.nd.array(np.random.default_rng(0).normal(size=(2, 3, 32, 32)))
    net(x)
    deployq.quantize(net, profile="ncnn")
    deployq.layerwise.calibrate_minmax(net, x.asnumpy())
    want = net(x).asnumpy()
    deployq.save(net, tmp_path / "r18", "resnet18_v1", (1, 3, 32, 32))
    again = deployq.load(tmp_path / "r18")
    np.testing.assert_array_equal(again(x).asnumpy(), want)
    assert want.shape == (2, 1000)


@pytest.mark.parametrize("argv,code,msg", [
    (["calibrate", "--model", "resnet18_v1", "--input-shape", "1,3,32,32"], 2, "no --data"),
    (["calibrate", "SYM", "--data", "IMGS"], 2, "no input shape"),
    (["export-ncnn", "SYM", "--input-shape", SHAPE, "--out", "OUT"], 2, "--scales"),
    (["calibrate", "SYM", "--input-shape", "1,3,48", "--data", "IMGS"], 2, "N,C,H,W"),
    (["calibrate", "SYM", "--input-shape", SHAPE, "--data", "BAD"], 3, "cannot decode image"),
    (["calibrate", "--qnet", "NOPE", "--data", "IMGS"], 3, "missing"),
    (["verify", "OUT", "--data", "IMGS"], 3, "deployq-export.json"),
    (["qat", "SYM", "--input-shape", SHAPE, "--data", "FLAT", "--out", "Q"], 2, "no labels"),
])
def test_errors(work, tmp_path, capsys, argv, code, msg):
    bad = tmp_path / "bad"
    (bad / "c0").mkdir(parents=True)
    (bad / "c0" / "x.png").write_text("not a png")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(flat / "a.png")
    subst = {"IMGS": str(work / "imgs"), "BAD": str(bad), "FLAT": str(flat), "OUT": str(tmp_path / "out"),
             "NOPE": str(tmp_path / "nope"), "Q": str(tmp_path / "q")}
    args: list[str] = []
    for a in argv:
        args += _model(work) if a == "SYM" else [subst.get(a, a)]
    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "q.params").exists()
