"""``deployq calibrate`` end to end (built-in model, saved quantized net, .npz and image-folder data), its option
checks and guard-rail lines, and ``deployq simulate --calib-mode`` implying offline ranges."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import apply, load

import deployq
from deployq.cli import main
from deployq.data import class_balanced_subset, load_mnist5k
from deployq.zoo import get_trained

METHODS = ["minmax", "ema", "kl", "percentile", "mse"]


@pytest.fixture(scope="module")
def calib_images():
    """The images ``--num-sample 3 --seed 0`` selects from MNIST-5k train (the CLI's builtin data)."""
    train = load_mnist5k("train")
    return train.x[class_balanced_subset(train.y, 3, 0)]


@pytest.fixture(scope="module")
def fp32_relu0(calib_images):
    """Reference activations: the input of resnet20's first residual body conv, by plain fp32 inference."""
    net = get_trained("resnet20", verbose=False)
    return net.features[:2](mx.nd.array(calib_images)).asnumpy()


@pytest.mark.parametrize("method", METHODS)
def test_calibrate_writes_a_loadable_scale_file(tmp_path, capsys, method, calib_images, fp32_relu0):
    out = tmp_path / "s.json"
    assert main(["calibrate", "resnet20", "--method", method, "--num-sample", "3", "--out", str(out), "--quiet"]) == 0
    qnet = deployq.quantize(get_trained("resnet20", verbose=False), profile="ncnn")
    sf = load(out, expect_fingerprint=deployq.fingerprint(qnet))
    assert out.read_text() == sf.to_json()  # what is written is exactly what the loader reads back
    assert len(sf.tensors) == len(deployq.quant_layers(qnet))
    r = sf.tensors["features.0:input"]
    assert (r.method, r.samples, r.tensor, r.kind, sf.profile) == (method, 30, "data", "input", "ncnn")
    assert r.observed_min == pytest.approx(float(calib_images.min()))
    assert r.observed_max == pytest.approx(float(calib_images.max()))
    assert r.clipped_share is not None and 0.0 <= r.clipped_share <= 1.0
    assert r.step == pytest.approx(r.threshold / 127)
    b = sf.tensors["features.2.0.body.0:input"]
    assert b.observed_max == pytest.approx(float(fp32_relu0.max()), rel=1e-5)
    assert 0 < b.threshold <= float(np.abs(fp32_relu0).max()) * (1 + 1e-6)
    if method == "minmax":
        assert b.threshold == pytest.approx(float(np.abs(fp32_relu0).max()), rel=1e-5) and b.clipped_share == 0.0
    if method == "percentile":  # default 99.99 % of |x|, against NumPy on the same activations
        assert b.threshold == pytest.approx(float(np.percentile(np.abs(fp32_relu0), 99.99)), rel=0.02)
    # the file calibrates a quantized net of the same model (fingerprints agree)
    assert apply(qnet, sf) == len(sf.tensors)
    assert deployq.quant_layers(qnet)["features.0"].input_threshold() == pytest.approx(r.threshold, rel=1e-6)


def test_method_options_reach_the_calibrator(tmp_path, fp32_relu0):
    p = tmp_path / "p.json"
    assert main(["calibrate", "resnet20", "--method", "percentile", "--percentile", "90", "--bins", "512",
                 "--num-sample", "3", "--out", str(p), "--quiet"]) == 0
    b = load(p).tensors["features.2.0.body.0:input"]
    assert b.threshold == pytest.approx(float(np.percentile(np.abs(fp32_relu0), 90)), rel=0.03)
    assert b.clipped_share == pytest.approx(0.10, abs=0.01)
    assert "--percentile 90" in load(p).producer
    k_on, k_off = tmp_path / "on.json", tmp_path / "off.json"
    assert main(["calibrate", "resnet20", "--method", "kl", "--num-sample", "3", "--out", str(k_on), "--quiet"]) == 0
    assert main(["calibrate", "resnet20", "--method", "kl", "--no-clip-guard", "--num-sample", "3",
                 "--out", str(k_off), "--quiet"]) == 0
    on, off = load(k_on).tensors, load(k_off).tensors
    # the guard only ever raises ncnn2table's threshold, and it does on the normalised MNIST input
    assert all(on[k].threshold >= off[k].threshold - 1e-9 for k in on)
    assert on["features.0:input"].threshold > off["features.0:input"].threshold
    k1 = tmp_path / "k1.json"
    assert main(["calibrate", "resnet20", "--method", "kl", "--one-pass", "--num-sample", "3", "--out", str(k1),
                 "--quiet"]) == 0
    assert "--one-pass" in load(k1).producer
    one = load(k1).tensors
    assert all(one[k].threshold <= one[k].observed_absmax for k in one)
    mm, plain = tmp_path / "mm.json", tmp_path / "plain.json"
    for out, extra in ((mm, []), (plain, ["--plain-graph"])):
        assert main(["calibrate", "resnet20", "--method", "minmax", "--num-sample", "3", "--out", str(out),
                     "--quiet", *extra]) == 0
    fused_t, plain_t = load(mm).tensors, load(plain).tensors  # BN folded or not: float rounding only
    assert all(fused_t[k].threshold == pytest.approx(plain_t[k].threshold, rel=1e-5) for k in plain_t)
    e = tmp_path / "e.json"
    assert main(["calibrate", "resnet20", "--method", "ema", "--momentum", "0.5", "--passes", "2",
                 "--batch-size", "8", "--num-sample", "3", "--out", str(e), "--quiet"]) == 0
    r = load(e).tensors["features.2.0.body.0:input"]
    assert r.threshold < float(np.abs(fp32_relu0).max())  # an average of batch maxima, below the overall max
    assert r.clipped_share is not None and r.clipped_share > 0


def test_qnet_with_npz_and_image_folder(tmp_path, capsys, calib_images):
    from PIL import Image

    qnet = deployq.quantize(get_trained("mobilenet0.25", verbose=False), profile="ncnn")
    deployq.save(qnet, tmp_path / "q", model_name="mobilenet0.25")
    y = np.repeat(np.arange(10), 3)
    np.savez(tmp_path / "d.npz", x=calib_images, y=y)
    out = tmp_path / "s.json"
    assert main(["calibrate", "--qnet", str(tmp_path / "q"), "--data", str(tmp_path / "d.npz"), "--method", "mse",
                 "--num-sample", "2", "--out", str(out), "--quiet"]) == 0
    sf = load(out, expect_fingerprint=deployq.fingerprint(qnet))
    assert sf.model_name == "mobilenet0.25" and sf.profile == "ncnn"
    r = sf.tensors["features.0:input"]
    assert r.samples == 20 and r.method == "mse"
    picked = calib_images[class_balanced_subset(y, 2, 0)]
    assert r.observed_max == pytest.approx(float(picked.max()))
    # an image folder: grey PNGs, scaled to [0, 1] and MNIST-normalised by deployq.verify.load_data
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out2 = tmp_path / "f.json"
    assert main(["calibrate", "--qnet", str(tmp_path / "q.params"), "--data", str(tmp_path / "imgs"),
                 "--method", "minmax", "--out", str(out2), "--quiet"]) == 0
    r2 = load(out2).tensors["features.0:input"]
    assert r2.samples == 5
    assert r2.observed_max <= (1 - 0.1307) / 0.3081 + 1e-5 and r2.observed_min >= -0.1307 / 0.3081 - 1e-5


@pytest.mark.parametrize("argv,msg", [
    (["resnet20", "--method", "kl", "--percentile", "99"], "--percentile does not apply to --method kl"),
    (["resnet20", "--method", "minmax", "--bins", "512"], "--bins does not apply to --method minmax"),
    (["resnet20", "--method", "ema", "--momentum", "1.5"], r"--momentum must be in \[0, 1\)"),
    (["resnet20", "--method", "percentile", "--percentile", "0"], r"--percentile must be in \(0, 100\]"),
    (["resnet20", "--method", "mse", "--bins", "1000"], "--bins must be a power of two for --method mse"),
    (["resnet20", "--method", "percentile", "--one-pass"], "--one-pass does not apply to --method percentile"),
    (["resnet20", "--method", "kl", "--one-pass", "--bins", "1000"], "--bins must be a power of two for --method kl"),
    (["resnet20", "--method", "kl", "--bins", "100"], "num_bins must exceed the 128 quantized levels"),
    (["resnet20", "--method", "kl", "--clip-guard", "2"], r"--clip-guard must be a share in \(0, 1\)"),
    (["resnet20", "--warn-clip-share", "-1"], r"--warn-clip-share must be in \[0, 1\]"),
    (["resnet20", "--num-sample", "0"], "--num-sample must be a positive integer"),
    ([], "give one model: --model NAME, --symbol FILE --params FILE, --qnet PATH"),
    (["resnet50"], "unknown model 'resnet50'"),
    (["resnet20", "--data", "nope.npz"], "nope.npz: no such file or folder"),
    (["--qnet", "nope"], "nope.deployq.json: missing"),
    (["resnet20", "--data", "NAN"], "images hold NaN or Inf values"),
    (["resnet20", "--data", "ZEROS", "--method", "kl"], "zero on every calibration image"),
    (["resnet20", "--data", "NOLABELS", "--num-sample", "2"], "has no labels"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, msg):
    x = load_mnist5k("train").x[:8].copy()
    special = {"NAN": x.copy(), "ZEROS": np.zeros_like(x), "NOLABELS": x}
    special["NAN"][3, 0, 5, 5] = np.nan
    argv = list(argv)
    for i, a in enumerate(argv):
        if a in special:
            path = tmp_path / f"{a}.npz"
            np.savez(path, x=special[a])
            argv[i] = str(path)
    out = tmp_path / "out" / "s.json"
    rc = main(["calibrate", *argv, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc in (2, 3), err  # 2: usage, 3: bad input (deployq.errors)
    assert re.search(msg, err), err
    assert err.startswith("deployq calibrate: error: ")
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


def test_guard_rail_lines_on_stderr_despite_pythonwarnings_ignore(tmp_path):
    """scripts/env.sh sets PYTHONWARNINGS=ignore: the CLI prints its guard-rail warnings itself, one clean line
    each, naming the layer; the 'far below the max of a signed tensor' rule fires with a tiny clipped share."""
    rng = np.random.default_rng(0)
    x = rng.laplace(scale=0.3, size=(64, 3, 32, 32)).astype(np.float32)
    x[0, 0, 0, 0] = 40.0  # one outlier: percentile 99.99 keeps ~4 % of the max, clipping only 0.01 %
    np.savez(tmp_path / "d.npz", x=x)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "deployq.cli", "calibrate", "resnet20", "--data",
                        str(tmp_path / "d.npz"), "--method", "percentile", "--warn-clip-share", "0.01",
                        "--out", str(out), "--quiet"], env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    first = [ln for ln in lines if ln.startswith("deployq calibrate: warning: layer features.0: percentile")]
    assert len(first) == 1, p.stderr
    assert "signed tensor cut below 0.5x its max" in first[0] and "Warning" not in p.stderr
    r = load(out).tensors["features.0:input"]
    assert r.clipped_share < 0.01 and r.threshold < 0.5 * 40.0
    native = "deployq: warning: deployq's native libraries were not built"  # (an install without a compiler)
    assert all(ln.startswith(("deployq calibrate: warning: layer", native)) for ln in lines)


def test_simulate_calib_mode_implies_offline(tmp_path, capsys):
    rc = main(["simulate", "--model", "resnet20", "--calib-mode", "kl", "--num-sample", "5", "--quiet",
               "--json", str(tmp_path / "r.json")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "--calib-mode kl implies --input-offline" in cap.err
    assert "offline/kl" in cap.out
    opts = json.loads((tmp_path / "r.json").read_text())["options"]
    assert opts["input_offline"] is True and opts["calib_mode"] == "kl"
    fp32 = float(re.search(r"fp32 top-1:\s+([\d.]+)%", cap.out).group(1))
    q = float(re.search(r"simulated top-1:\s+([\d.]+)%", cap.out).group(1))
    assert abs(fp32 - q) <= 1.0, cap.out
    # the KL ranges are in effect: the same options calibrated through the API give the same top-1
    from deployq.simulate import SimOptions, simulate

    r = simulate(SimOptions(model="resnet20", input_offline=True, calib_mode="kl", num_sample=5))
    assert 100 * r.quant_top1 == pytest.approx(q, abs=0.005)
    # without --calib-mode nothing is implied (online ranges, the default)
    assert main(["simulate", "--model", "resnet20", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "implies" not in cap.err and "online)" in cap.out
