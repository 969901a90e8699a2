"""``deployq export-tengine``: deterministic output; bad inputs fail cleanly (message, exit 2, no files)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from deployq.cli import main


def _export_small(tmp_path, name="small"):
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=3), nn.BatchNorm(), nn.Activation("relu"), nn.GlobalAvgPool2D(),
            nn.Dense(3))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.export(str(tmp_path / name))
    return tmp_path / f"{name}-symbol.json", tmp_path / f"{name}-0000.params"


def _cli(js, ps, out, *extra):
    return main(["export-tengine", "--symbol", str(js), "--params", str(ps), "--out", str(out),
                 "--calib-samples", "64", "--data", "builtin",
                 *([] if "--input-shape" in extra else ["--input-shape", "1,3,32,32"]),
                 *extra])


def test_files_and_byte_identical(tmp_path, capsys):
    args = ["export-tengine", "mobilenet0.25", "--calib-samples", "128", "--out"]
    assert main(args + [str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    # a second run in a fresh process (hash seeds, MXNet state) writes the same bytes
    subprocess.run([sys.executable, "-m", "deployq.cli", *args, str(tmp_path / "b")], check=True,
                   capture_output=True)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["USAGE.txt", "deployq-export.json", "mobilenet0.25-0000.params", "mobilenet0.25-symbol.json",
                     "mobilenet0.25.scale", "mobilenet0.25.scales.json"]
    assert f"wrote {tmp_path / 'a' / 'mobilenet0.25.scale'}" in printed
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_reexport_with_own_scale_file_is_identical(tmp_path):
    js, ps = _export_small(tmp_path)
    assert _cli(js, ps, tmp_path / "a", "--name", "m") == 0
    a = tmp_path / "a"
    assert _cli(a / "m-symbol.json", a / "m-0000.params", tmp_path / "b", "--name", "m",
                "--scales", str(a / "m.scales.json"), "--calib-samples", "0") == 0
    for n in ("m-symbol.json", "m-0000.params", "m.scale"):
        assert (a / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def _unsupported(js, ps):
    d = json.loads(js.read_text())
    act = next(n for n in d["nodes"] if n["op"] == "Activation")
    act["op"] = "hard_sigmoid"
    js.write_text(json.dumps(d))
    return rf"{js.name}: node '{act['name']}'.*unsupported op hard_sigmoid; supported ops: Convolution"


def _truncated(js, ps):
    ps.write_bytes(ps.read_bytes()[:300])
    return rf"{ps.name}: corrupt or truncated MXNet params file"


def _corrupt(js, ps):
    ps.write_bytes(bytes(range(256)) * 3)
    return rf"{ps.name}: corrupt or truncated MXNet params file"


def _numpy_mode(js, ps):
    arrays = {k: v.asnumpy() for k, v in mx.nd.load(str(ps)).items()}
    mx.npx.set_np()
    try:
        mx.npx.save(str(ps), {k: mx.np.array(v) for k, v in arrays.items()})
    finally:
        mx.npx.reset_np()
    return rf"{ps.name}: numpy-mode params \(array magic 0xF993FACA"


def _nan(js, ps):
    arrays = mx.nd.load(str(ps))
    key = next(k for k in arrays if "conv" in k and k.endswith("weight"))
    w = arrays[key].asnumpy()
    w[1, 0, 0, 0] = np.nan
    arrays[key] = mx.nd.array(w)
    mx.nd.save(str(ps), arrays)
    return rf"{ps.name}: param '{key[4:]}' holds NaN"


def _dead_channel(js, ps):
    arrays = mx.nd.load(str(ps))
    key = next(k for k in arrays if "conv" in k and k.endswith("weight"))
    w = arrays[key].asnumpy()
    w[1] = 0
    arrays[key] = mx.nd.array(w)
    arrays[key.replace("weight", "bias")] = mx.nd.array([0.0, 0.3, 0.0, 0.0])
    mx.nd.save(str(ps), arrays)
    return r"\(Convolution\): output channel\(s\) \[1\] have all-zero weights but a non-zero bias"


def _other_model_scales(js, ps):
    return "scale file is for model 'resnet20'"


def _incomplete_scales(js, ps):
    return r"s\.json: missing fields profile, producer"


def _bad_field_scales(js, ps):
    return r"s\.json: tensor 'data': field 'threshold' must be a number \(finite\), got 'x'"


@pytest.mark.parametrize("breaker", [_unsupported, _truncated, _corrupt, _numpy_mode, _nan, _dead_channel,
                                     _other_model_scales, _incomplete_scales, _bad_field_scales])
def test_bad_input(tmp_path, capsys, breaker):
    js, ps = _export_small(tmp_path)
    msg = breaker(js, ps)
    extra = []
    if breaker in (_other_model_scales, _incomplete_scales, _bad_field_scales):
        # a valid scale file of this model (its own export), then broken; read with deployq's strict loader
        assert _cli(js, ps, tmp_path / "ref", "--name", "m") == 0
        scales = json.loads((tmp_path / "ref" / "m.scales.json").read_text())
        if breaker is _other_model_scales:
            scales["model"] = {"name": "resnet20", "fingerprint": "sha256:0123456789abcdef"}
        elif breaker is _incomplete_scales:
            del scales["profile"], scales["producer"]
        else:
            scales["tensors"]["data"]["threshold"] = "x"
        (tmp_path / "s.json").write_text(json.dumps(scales))
        extra = ["--scales", str(tmp_path / "s.json")]
        capsys.readouterr()
    out = tmp_path / "out"
    assert _cli(js, ps, out, *extra) in (2, 3)  # usage / bad input (deployq.errors)
    err = capsys.readouterr().err
    assert re.search(msg, err), err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("config,kept", [
    ([{"op_types": ["Conv2D", "Dense"]}, {"op_names": ["features.0"], "exclude": True}], "features.0"),
    ([{"op_types": ["Conv2D", "Dense"]}, {"op_names": ["output"], "quant_types": ["weight"]}], "output"),
])
def test_mixed_precision_is_refused(tmp_path, capsys, config, kept):
    """Tengine quantizes every Conv/FC: a net that keeps a layer in fp32 (the sensitivity fallback) is refused,
    naming the layer, with exit 3 (bad input) and nothing written."""
    import deployq
    from deployq.zoo import get_trained

    qnet = deployq.quantize(get_trained("resnet20", verbose=False), config, profile="tengine")
    deployq.save(qnet, tmp_path / "q", model_name="resnet20")
    assert main(["export-tengine", "--qnet", str(tmp_path / "q"), "--out", str(tmp_path / "out")]) == 3  # bad input
    err = capsys.readouterr().err
    assert re.search(rf"layers kept in fp32: {re.escape(kept)};.*no mixed precision", err), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # the same refusal from a scale file that marks a layer unquantized
    js, ps = _export_small(tmp_path)
    assert _cli(js, ps, tmp_path / "a", "--name", "m") == 0
    s = json.loads((tmp_path / "a" / "m.scales.json").read_text())
    layer = next(iter(s["layers"]))
    s["layers"][layer]["quantized"] = False
    (tmp_path / "s.json").write_text(json.dumps(s))
    assert _cli(js, ps, tmp_path / "b", "--scales", str(tmp_path / "s.json")) == 3
    assert f"layers kept in fp32: {layer}" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())
