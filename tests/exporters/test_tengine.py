"""Tengine export: the files Tengine parses, its weight grid, its scale table, and int8 agreement between the
IR simulation and a NumPy model of Tengine's arithmetic run on the exported files."""

from __future__ import annotations

import json
import re
import struct

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.frontend import from_files, from_gluon
from deployq.exporters.ir.mxnet_lower import run
from deployq.exporters.tengine import lower as tengine
from deployq.exporters.tengine.reference import TengineReference, read_scale_table
from deployq.exporters.tengine.simulate import simulate
from deployq.exporters.tengine.writer import write
from mxnet import gluon

from deployq.data import load_mnist5k
from deployq.zoo import get_trained

from .conftest import MODELS, rel_err

CALIB = [load_mnist5k("train").x[:128], load_mnist5k("train").x[128:256]]


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    name = request.param
    g = from_gluon(get_trained(name, verbose=False), name=name)
    exp = tengine.lower_model(g, CALIB)
    paths = write(exp, tmp_path_factory.mktemp(name))
    return name, g, exp, paths


@pytest.fixture(scope="module")
def int8_outputs(exported, test_images):
    _, _, exp, paths = exported
    return simulate(exp, test_images), TengineReference(*paths[:3])(test_images)


def test_int8_reference_agrees_with_simulation(exported, int8_outputs, test_images):
    name, g, exp, _ = exported
    sim, ref = int8_outputs
    step = exp.scale_of(exp.tensor_map[exp.graph.outputs[0]]).step
    assert sim.shape == ref.shape == (1000, 10)
    assert np.mean(sim.argmax(1) == ref.argmax(1)) == 1.0
    assert np.abs(sim - ref).max() <= step * (1 + 1e-4)
    np.testing.assert_array_equal(sim, ref)  # integer-domain simulation: bit-exact to the reference
    # the int8 model is a faithful quantization of the fp32 one
    y = load_mnist5k("test").y
    fp32_acc = np.mean(run(g, test_images)[g.outputs[0]].argmax(1) == y)
    assert np.mean(ref.argmax(1) == y) >= fp32_acc - 0.01


def test_reload_in_mxnet_equals_folded_graph(exported, test_images):
    _, g, exp, (js, ps, *_) = exported
    net = gluon.SymbolBlock.imports(str(js), ["data"], str(ps))
    x = test_images[:100]
    out = net(mx.nd.array(x)).asnumpy()
    assert rel_err(out, run(exp.graph, x)[exp.graph.outputs[0]]) <= 1e-5
    assert not [n for n in exp.graph.nodes if n.op in ("BatchNorm", "Dropout")]


def test_files_tengine_parses(exported):
    _, _, _, (js, ps, *_) = exported
    text = js.read_text()
    d = json.loads(text)
    assert text.startswith('{\n  "nodes": [\n    {\n      "op": "null", \n      "name": "data"')
    names = [n["name"] for n in d["nodes"]]
    assert len(set(names)) == len(names)
    ops = {n["op"] for n in d["nodes"]}
    assert not {o for o in ops if o.startswith("_contrib_") or o in ("softmax", "relu", "BatchNorm")}
    raw = ps.read_bytes()
    assert struct.unpack("<QQQ", raw[:24])[0] == 0x112
    assert struct.unpack("<I", raw[24:28])[0] in (0xF993FAC9, 0xF993FAC8)  # legacy, not numpy-mode 0xF993FACA
    loaded = mx.nd.load(str(ps))
    assert all(v.dtype == np.float32 for v in loaded.values())
    assert {k.split(":")[0] for k in loaded} <= {"arg", "aux"}


def test_weights_on_tengine_grid(exported):
    """Tengine recomputes s_c = max|W_c|/127 from the written weights: it must find our steps and codes."""
    _, _, exp, (js, ps, *_) = exported
    g = from_files(js, ps)
    for n in g.nodes:
        if n.op not in ("Convolution", "FullyConnected"):
            continue
        w = g.param(n, "weight")
        flat = w.reshape(w.shape[0], -1)
        s = (np.abs(flat).max(1) / np.float32(127)).astype(np.float32)  # Tengine, float32
        np.testing.assert_array_equal(s, exp.weight_steps[n.name])
        q = flat / s[:, None]
        codes = np.sign(q) * np.floor(np.abs(q) + 0.5)
        np.testing.assert_allclose(q, codes, atol=1e-4)  # exactly on the grid
        assert (np.abs(codes).max(1) == 127).all()
        np.testing.assert_array_equal((codes * s[:, None]).astype(np.float32), flat)


def test_trained_codes_are_kept():
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    codes[:, 0, 0, 0] = [127, -127, 127, -127]
    w_f = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w, s, q = tengine.on_grid(w_f, codes)
    np.testing.assert_array_equal(q, codes)
    s_t = tengine.weight_steps(w)
    np.testing.assert_array_equal(s_t, s)
    np.testing.assert_array_equal(tengine.weight_codes(w, s_t), codes)
    with pytest.raises(ValueError, match="reach"):
        tengine.on_grid(w_f, (codes // 2).astype(np.int8))


def test_scale_table(exported):
    _, _, exp, (js, _, table, scales_json) = exported
    lines = table.read_text().splitlines()
    assert lines[0].startswith("data ") and all(re.fullmatch(r"\S+ [0-9.e+-]+ 0", ln) for ln in lines)
    steps = read_scale_table(table)
    g = from_files(js, exp.graph and js.with_name(js.name.replace("-symbol.json", "-0000.params")))
    fused_convs = set(exp.fused)
    # every Tengine tensor has a scale; fused activations are keyed by their conv
    for n in g.nodes:
        tg = exp.tensor_map.get(n.output)
        if n.name in fused_convs:
            assert n.output in steps
        else:
            assert tg in steps, n.name
    for r in exp.scales:
        assert float(f"{r.step:.9g}") == steps[r.tensor]
        assert steps[r.tensor] == pytest.approx(r.threshold / 127, rel=1e-8)
    for n in g.nodes:  # byte-copy / inplace ops keep one scale
        if n.op == "Flatten" or (n.op == "Pooling" and n.attrs["pool_type"] == "max"):
            assert steps[exp.tensor_map[n.inputs[0]]] == steps[exp.tensor_map[n.output]]
    d = json.loads(scales_json.read_text())
    assert d["schema"] == "deployq.scales" and d["profile"] == "tengine" and d["model"]["fingerprint"]
    assert set(d["tensors"]) == set(steps)


def test_quantized_net_codes_and_thresholds(tmp_path, test_images):
    """A net quantized with the tengine profile: Tengine recovers its trained codes; its layer-input
    thresholds win over calibration; the CLI exports it from deployq.save files."""
    from deployq.exporters.tengine.cli import graph_from_qnet
    from mxnet import autograd

    import deployq
    from deployq.cli import main

    net = get_trained("mobilenet0.25", verbose=False)
    deployq.quantize(net, profile="tengine")
    for xb in CALIB:  # training steps (lr 0) track the input ranges; MXNet updates state in the backward
        with autograd.record():
            loss = net(mx.nd.array(xb)).sum()
        loss.backward()
    g = graph_from_qnet(net, name="qmobilenet")
    exp = tengine.lower_model(g, CALIB)
    layers = deployq.quant_layers(net)
    data = exp.scale_of("data")
    assert data.source == "quantized-net" and data.threshold == pytest.approx(layers["features.0"].input_threshold())
    paths = write(exp, tmp_path / "lib")
    files = from_files(*paths[:2])
    for n in g.nodes:
        if "wq" in n.attrs:
            w = files.param(files.node(n.name), "weight")
            np.testing.assert_array_equal(tengine.weight_codes(w, tengine.weight_steps(w)),
                                          n.attrs["wq"].codes.astype(np.int8))
    sim, ref = simulate(exp, test_images[:300]), TengineReference(*paths[:3])(test_images[:300])
    step = exp.scale_of(exp.tensor_map[exp.graph.outputs[0]]).step
    assert np.mean(sim.argmax(1) == ref.argmax(1)) == 1.0 and np.abs(sim - ref).max() <= step * (1 + 1e-4)
    np.testing.assert_array_equal(sim, ref)
    deployq.save(net, tmp_path / "qm", model_name="mobilenet0.25")
    assert main(["export-tengine", "--qnet", str(tmp_path / "qm.params"), "--out", str(tmp_path / "cli"),
                 "--calib-samples", "256", "--name", "qm"]) == 0
    assert (tmp_path / "cli" / "qm.scale").read_text().splitlines()[0] == f"data {data.step:.9g} 0"
    # the core's scale file on the fp32 model: its layer-input thresholds win over calibration
    (tmp_path / "s.json").write_text(json.dumps(deployq.export_scales(net, "mobilenet0.25")))
    assert main(["export-tengine", "mobilenet0.25", "--scales", str(tmp_path / "s.json"), "--out",
                 str(tmp_path / "fp"), "--calib-samples", "128"]) == 0
    table = read_scale_table(tmp_path / "fp" / "mobilenet0.25.scale")
    for path, blk in layers.items():
        tg = exp.tensor_map[g.node(path).inputs[0]]
        assert table[tg] == pytest.approx(blk.input_threshold() / 127, rel=1e-7), path


def test_reference_refuses_missing_scale(exported, tmp_path):
    """Tengine silently uses scale 0 for a tensor missing from the table; the reference refuses instead."""
    _, _, exp, (js, ps, table, _) = exported
    lines = table.read_text().splitlines()
    victim = lines[3].split(" ")[0]
    short = tmp_path / "short.scale"
    short.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(Exception, match=rf"no scale for tensors \['{re.escape(victim)}'\]"):
        TengineReference(js, ps, short)
