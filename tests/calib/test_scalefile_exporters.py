"""Every exporter's scale file is one schema (deployq.scales v1): it loads with ``deployq.calib.load``, round-trips
byte for byte, carries the calibration's provenance, is byte-identical across runs, and every exporter reads scale
files with that one strict loader."""

from __future__ import annotations

import json
import warnings

import mxnet as mx
import numpy as np
import pytest
from deployq.calib import CalibrationWarning, ScaleFile, ScaleFileError, apply, calibrate, load
from deployq.calib.scalefile import StreamHash, TensorRange
from deployq.exporters.ir import mxnet_lower
from deployq.exporters.ir.frontend import from_gluon
from deployq.exporters.ncnn import export as ncnn_export
from deployq.exporters.onnx import export as onnx_export
from deployq.exporters.tengine import cli as tengine_cli

import deployq
from deployq.cli import main as deployq_main
from deployq.data import class_balanced_subset, load_mnist5k
from deployq.profiles import load_profile
from deployq.zoo import get_trained


@pytest.fixture(scope="module")
def calib_x():
    train = load_mnist5k("train")
    return train.x[class_balanced_subset(train.y, 5, 0)]


def _calibrated(name, profile, method, x):
    qnet = deployq.quantize(get_trained(name, verbose=False), profile=profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        sf = calibrate(qnet, x, method=method, profile=profile, quiet=True, model_name=name)
    apply(qnet, sf)
    return qnet, sf


def _load_round_trip(path, fingerprint):
    text = path.read_text()
    sf = load(path, expect_fingerprint=fingerprint)
    assert sf.to_json() == text  # loaded and written again: the same bytes
    assert ScaleFile.from_dict(json.loads(text)).to_dict() == json.loads(text)
    return sf


def _same_provenance(got, ref, layer_paths):
    assert set(got.tensors) == {f"{p}:input" for p in layer_paths}
    for k, r in ref.tensors.items():
        e = got.tensors[k]
        assert (e.layer, e.kind, e.tensor, e.method, e.samples, e.data_hash) == \
            (r.layer, "input", r.tensor, r.method, r.samples, r.data_hash)
        assert (e.observed_min, e.observed_max, e.clipped_share) == (r.observed_min, r.observed_max, r.clipped_share)
        assert e.threshold == pytest.approx(r.threshold, rel=1e-6)  # the net holds the range in float32
        assert (e.bits, e.signed, e.symmetric, e.zero_point) == (r.bits, r.signed, r.symmetric, r.zero_point)
        assert e.step == pytest.approx(r.step, rel=1e-6)


def test_ncnn_scale_file(tmp_path, calib_x):
    qnet, ref = _calibrated("mobilenet0.25", "ncnn", "kl", calib_x)
    files = ncnn_export.export_qnet(qnet, tmp_path / "a", "m")
    sf = _load_round_trip(files["scales"], deployq.fingerprint(qnet))
    assert sf.profile == "ncnn" and sf.model_name == "m"
    _same_provenance(sf, ref, deployq.quant_layers(qnet))
    assert ref.tensors["features.0:input"].samples == 50
    # ncnn's multiplier is 127 / threshold: the table line of the first layer's input
    table = {ln.split()[0]: float(ln.split()[1]) for ln in files["table"].read_text().splitlines()
             if ln and not ln.split()[0].endswith("_param_0")}
    mult = sf.tensors["features.0:input"].multiplier
    assert any(v == pytest.approx(mult, rel=1e-5) for v in table.values()), (mult, table)
    again = ncnn_export.export_qnet(qnet, tmp_path / "b", "m")
    assert again["scales"].read_bytes() == files["scales"].read_bytes()
    # the file route (MXNet json/params + scale file) reads that file with the strict loader and writes it back
    net = get_trained("mobilenet0.25", verbose=False)
    sym, args, aux = mxnet_lower.to_symbol(from_gluon(net))
    (tmp_path / "m-symbol.json").write_text(sym.tojson())
    mx.nd.save(str(tmp_path / "m-0000.params"), {**{f"arg:{k}": v for k, v in args.items()},
                                                   **{f"aux:{k}": v for k, v in aux.items()}})
    out = ncnn_export.export_files(tmp_path / "m-symbol.json", tmp_path / "m-0000.params", files["scales"],
                                   tmp_path / "c", "m")
    assert out["scales"].read_bytes() == files["scales"].read_bytes()
    bad = json.loads(files["scales"].read_text())
    bad["tensors"]["features.0:input"]["symmetric"] = "yes"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ScaleFileError, match=r"bad\.json: tensor 'features\.0:input': field 'symmetric' must be a "
                                             r"boolean, got 'yes'"):
        ncnn_export.export_files(tmp_path / "m-symbol.json", tmp_path / "m-0000.params", tmp_path / "bad.json",
                                 tmp_path / "d", "m")
    assert not (tmp_path / "d").exists()


def test_onnx_scale_file_uint8(tmp_path, calib_x):
    qnet, ref = _calibrated("resnet20", "onnx", "minmax", calib_x)
    files = onnx_export.export_qnet(qnet, tmp_path / "a", "r", fp32=False)
    sf = _load_round_trip(files["scales"], deployq.fingerprint(qnet))
    _same_provenance(sf, ref, deployq.quant_layers(qnet))
    r = sf.tensors["features.0:input"]  # the normalised MNIST input on onnxruntime's affine uint8 grid
    assert (r.bits, r.signed, r.symmetric) == (8, False, False)
    assert r.step == pytest.approx((r.hi - r.lo) / 255, rel=1e-6)
    assert r.zero_point == int(np.round(-r.lo / r.step)) and 0 < r.zero_point < 255
    assert r.lo == pytest.approx(float(calib_x.min())) and r.hi == pytest.approx(float(calib_x.max()))
    again = onnx_export.export_qnet(qnet, tmp_path / "b", "r", fp32=False)
    assert again["scales"].read_bytes() == files["scales"].read_bytes()


def test_tengine_scale_file(tmp_path, calib_x):
    assert deployq_main(["export-tengine", "resnet20", "--calib-samples", "64", "--out", str(tmp_path / "a"),
                             "--name", "r"]) == 0
    sf = _load_round_trip(tmp_path / "a" / "r.scales.json", deployq.fingerprint(
        deployq.quantize(get_trained("resnet20", verbose=False), profile="tengine")))
    assert sf.profile == "tengine"
    batches_ = tengine_cli.calibration_images(64)  # the images export-tengine calibrates on
    x = np.concatenate(batches_)
    h = StreamHash()
    for b in batches_:
        h.update(b)
    d = sf.tensors["data"]
    assert (d.kind, d.layer, d.method, d.samples, d.data_hash) == ("activation", None, "calibration-minmax", 64,
                                                                 h.hexdigest())
    assert d.observed_min == pytest.approx(float(x.min())) and d.observed_max == pytest.approx(float(x.max()))
    assert d.threshold == pytest.approx(float(np.abs(x).max())) and d.clipped_share == 0.0
    assert d.step == pytest.approx(d.threshold / 127)
    table = dict(ln.split()[:2] for ln in (tmp_path / "a" / "r.scale").read_text().splitlines())
    assert all(float(table[k]) == float(f"{r.step:.9g}") for k, r in sf.tensors.items())
    assert all(len(v["weight_step"]) > 0 for v in sf.layers.values())
    # a deployq calibration file given to Tengine: its thresholds win; Tengine's file still loads
    _, ref = _calibrated("resnet20", "tengine", "kl", calib_x)
    ref.save(tmp_path / "kl.json")
    assert deployq_main(["export-tengine", "resnet20", "--scales", str(tmp_path / "kl.json"), "--calib-samples",
                             "64", "--out", str(tmp_path / "b"), "--name", "r"]) == 0
    sf2 = _load_round_trip(tmp_path / "b" / "r.scales.json", sf.fingerprint)
    assert sf2.tensors["data"].threshold == pytest.approx(ref.tensors["features.0:input"].threshold)
    assert sf2.tensors["data"].samples is None  # its provenance is the other file's, not this export's


def test_tracked_ranges_and_provenance_through_save_load(tmp_path, calib_x):
    qnet, ref = _calibrated("resnet20", "ncnn", "percentile", calib_x)
    d = deployq.export_scales(qnet, "resnet20")
    assert d["tensors"]["features.0:input"]["method"] == "percentile"
    deployq.save(qnet, tmp_path / "q", model_name="resnet20")
    back = deployq.load(tmp_path / "q")
    assert deployq.export_scales(back, "resnet20") == d  # provenance kept by save/load
    # a range changed after calibration is no longer the calibration's: written as tracked, provenance null
    blk = deployq.quant_layers(back)["features.0"]
    blk.set_input_range(-1.0, 2.0)
    e = ScaleFile.from_dict(deployq.export_scales(back, "resnet20")).tensors["features.0:input"]
    assert (e.method, e.samples, e.data_hash, e.observed_max, e.threshold) == ("tracked", None, None, None, 2.0)
    # a QAT-tracked net (never calibrated): every range is tracked, samples unknown (null), and the dict loads
    net = deployq.quantize(get_trained("resnet20", verbose=False), profile="ncnn")
    from mxnet import autograd

    with autograd.record():
        net(mx.nd.array(calib_x[:16])).sum().backward()
    sf = ScaleFile.from_dict(deployq.export_scales(net, "resnet20"))
    assert {r.method for r in sf.tensors.values()} == {"tracked"}
    assert all(r.samples is None and r.data_hash is None for r in sf.tensors.values())
    assert sf.tensors["features.0:input"].observed_min is None
    assert sf.tensors["features.0:input"].lo == pytest.approx(float(calib_x[:16].min()))


def test_loader_rejects_with_file_and_field(tmp_path):
    g = load_profile("ncnn").activation
    sf = ScaleFile("m", "sha256:00", "ncnn", "test")
    sf.tensors["a:input"] = TensorRange.on_grid("a", "input", "data", "kl", 2.54, -0.5, 2.54, g, samples=10)
    p = sf.save(tmp_path / "s.json")
    ok = load(p)
    assert ok.tensors["a:input"].step == pytest.approx(0.02) and ok.tensors["a:input"].data_hash is None
    base = json.loads(p.read_text())

    def bad(mutate, msg):
        d = json.loads(json.dumps(base))
        mutate(d)
        (tmp_path / "b.json").write_text(json.dumps(d))
        with pytest.raises(ScaleFileError, match=msg):
            load(tmp_path / "b.json")

    bad(lambda d: d["tensors"]["a:input"].update(symmetric=None), r"b\.json: tensor 'a:input': field 'symmetric' "
                                                                   "may not be null")
    bad(lambda d: d["tensors"]["a:input"].update(extra=1), r"b\.json: tensor 'a:input': unknown fields extra")
    bad(lambda d: d["tensors"]["a:input"].pop("layer"), r"b\.json: tensor 'a:input': missing fields layer")
    bad(lambda d: d["tensors"]["a:input"].update(kind="weight"), "field 'kind' must be one of input, activation")
    bad(lambda d: d["tensors"]["a:input"].update(threshold=-1.0), "field 'threshold' must be >= 0")
    bad(lambda d: d["tensors"]["a:input"].update(bits=8.0), "field 'bits' must be an integer, got 8.0")
    bad(lambda d: d["tensors"]["a:input"].update(clipped_share=2.0), r"field 'clipped_share' must be in \[0, 1\]")
    bad(lambda d: d.update(qmax=127), r"b\.json: unknown fields qmax")
    bad(lambda d: d["layers"].update(a={"quantized": 1}), r"b\.json: layer 'a': field 'quantized' must be a boolean")
    bad(lambda d: d["model"].pop("fingerprint"), r"b\.json: field 'model': missing fields fingerprint")
    # optional fields may be absent (read as null)
    d = json.loads(json.dumps(base))
    for k in ("samples", "data_hash", "observed_min", "observed_max", "clipped_share"):
        del d["tensors"]["a:input"][k]
    r = ScaleFile.from_dict(d).tensors["a:input"]
    assert (r.samples, r.data_hash, r.observed_absmax, r.clipped_share) == (None, None, None, None)
    with pytest.raises(ScaleFileError, match="cannot read the scale file"):
        load(tmp_path / "missing.json")
