"""ncnn/Caffe file formats: table, .param float literals, Split, Caffe round trip, pooling, CLI behaviour."""

from __future__ import annotations

import json
import re

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir import mxnet_lower
from deployq.exporters.ir.graph import Graph, Node, UnsupportedOpError
from deployq.exporters.ncnn import caffe_pb2
from deployq.exporters.ncnn.caffe import caffe_pool_size, to_caffe
from deployq.exporters.ncnn.export import SUFFIXES, balanced_images, export_qnet, minmax_calibrate, qnet_graphs
from deployq.exporters.ncnn.lower import lower
from deployq.exporters.ncnn.runtime import run
from deployq.exporters.ncnn.write import bin_bytes, format_param, param_text
from google.protobuf import text_format
from mxnet import gluon

import deployq
from deployq.cli import main
from deployq.zoo import get_trained

from .conftest import MODELS


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    name = request.param
    net = get_trained(name, verbose=False)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, balanced_images(10))
    return name, net, export_qnet(net, tmp_path_factory.mktemp(name), name)


def read_table(text: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """ncnn2int8's read_int8scale_table: stop at the first empty line; ``_param_`` keys are weight scales."""
    weights, blobs = {}, {}
    for line in text.split("\n"):
        if not line.strip():
            break
        key, *vals = line.split()
        (weights if "_param_" in key else blobs)[key] = [float(v) for v in vals]
    return weights, blobs


def param_lines(text: str) -> list[list[str]]:
    lines = text.splitlines()
    assert lines[0] == "7767517"
    return [ln.split() for ln in lines[2:]]


def test_table_format(exported):
    name, net, files = exported
    text = files["table"].read_text()
    assert text.endswith("\n") and "\n\n" not in text
    keys = [ln.split()[0] for ln in text.splitlines()]
    n_w = sum("_param_" in k for k in keys)
    assert all("_param_" in k for k in keys[:n_w]) and not any("_param_" in k for k in keys[n_w:])
    weights, blobs = read_table(text)
    assert len(weights) + len(blobs) == len(keys)  # nothing lost to a blank line
    _, gq = qnet_graphs(net, name)
    layers = deployq.quant_layers(net)
    assert set(blobs) == set(layers) and set(weights) == {f"{p}_param_0" for p in layers}
    for path, blk in layers.items():
        node = gq.node(path)
        w = gq.param(node, "weight")
        amax = np.abs(w.reshape(len(w), -1)).max(1)
        want = np.where(amax > 0, np.float32(127) / amax, 0).astype(np.float32)
        np.testing.assert_array_equal(np.array(weights[f"{path}_param_0"], np.float32), want)
        assert np.float32(blobs[path][0]) == np.float32(127) / np.float32(blk.input_threshold())


def test_param_float_literals_and_counts(exported):
    _, _, files = exported
    for key in ("fp32_param", "int8_param"):
        text = files[key].read_text()
        rows = param_lines(text)
        n_layers, n_blobs = map(int, text.splitlines()[1].split())
        assert n_layers == len(rows)
        tops = [t for r in rows for t in r[4 + int(r[2]):4 + int(r[2]) + int(r[3])]]
        assert n_blobs == len(set(tops)) == len(tops)
        for r in rows:
            for kv in r[4 + int(r[2]) + int(r[3]):]:
                k, v = kv.split("=", 1)
                if r[0] == "Softmax":
                    assert kv in ("0=0", "1=1")
                if int(k) <= -23300:
                    vals = v.split(",")
                    assert int(vals[0]) == len(vals) - 1
                    assert all(re.search(r"[.eE]", x) for x in vals[1:])


def test_format_param_rules():
    assert format_param(1, 6.0) == ("1", "6.000000000e+00")
    assert format_param(0, 3) == ("0", "3")
    assert format_param(10, (0.0, 6.0)) == ("-23310", "2,0.000000000e+00,6.000000000e+00")


def test_split_insertion(exported):
    name, _, files = exported
    rows = param_lines(files["int8_param"].read_text())
    bottoms = [b for r in rows for b in r[4:4 + int(r[2])]]
    assert len(bottoms) == len(set(bottoms))  # each blob consumed by exactly one layer
    splits = [r for r in rows if r[0] == "Split"]
    if name == "resnet20":
        assert len(splits) == 9
        s = splits[0]
        assert s[1] == "splitncnn_0" and s[3] == "2" and s[5:7] == [f"{s[4]}_splitncnn_0", f"{s[4]}_splitncnn_1"]
    else:
        assert not splits


def test_caffe_round_trip(exported):
    name, net, files = exported
    arch = text_format.Parse(files["prototxt"].read_text(), caffe_pb2.NetParameter())
    model = caffe_pb2.NetParameter()
    model.ParseFromString(files["caffemodel"].read_bytes())
    assert [ly.name for ly in arch.layer] == [ly.name for ly in model.layer]
    assert not any(ly.blobs for ly in arch.layer)
    _, gq = qnet_graphs(net, name)
    by_name = {ly.name: ly for ly in model.layer}
    for path in deployq.quant_layers(net):
        node, ly = gq.node(path), by_name[path]
        w = np.array(ly.blobs[0].data, np.float32).reshape(tuple(ly.blobs[0].shape.dim))
        np.testing.assert_array_equal(w.reshape(-1), gq.param(node, "weight").reshape(-1))
        np.testing.assert_array_equal(np.array(ly.blobs[1].data, np.float32), gq.param(node, "bias"))
        if node.op == "Convolution" and node.attrs["num_group"] > 1:
            assert ly.convolution_param.group == node.attrs["num_group"]
    relus = [ly for ly in arch.layer if ly.type == "ReLU"]
    assert relus and all(ly.top[0] == ly.bottom[0] for ly in relus if ly.name.endswith(".2"))
    table_keys = {ln.split()[0] for ln in files["table"].read_text().splitlines()}
    assert {k.removesuffix("_param_0") for k in table_keys} <= set(by_name)


def _pool_graph(h: int, **attrs) -> Graph:
    a = {"kernel": (3, 3), "stride": (2, 2), "pad": (0, 0), "pool_type": "max", "global_pool": False,
         "pooling_convention": "valid", "count_include_pad": None, "layout": "None"}
    a.update(attrs)
    return Graph([Node("Pooling", "pool", ["data"], ["pool"], a)], {}, ["pool"], (1, 2, h, h))


@pytest.mark.parametrize("h,attrs", [
    (9, {}), (10, {}), (10, {"pooling_convention": "full"}), (10, {"pad": (1, 1), "pool_type": "avg"}),
    (11, {"pad": (1, 1), "pool_type": "avg", "count_include_pad": False}), (8, {"global_pool": True}),
])
def test_pooling_ncnn_matches_mxnet(tmp_path, h, attrs):
    g = _pool_graph(h, **attrs)
    x = np.random.default_rng(0).normal(size=(2, 2, h, h)).astype(np.float32)
    ref = mxnet_lower.run(g, x)["pool"]
    m = lower(g)
    (tmp_path / "p.param").write_text(param_text(m))
    (tmp_path / "p.bin").write_bytes(bin_bytes(m))
    out = run(tmp_path / "p.param", tmp_path / "p.bin", x, output_blob="pool")
    np.testing.assert_allclose(out, ref.reshape(2, -1), rtol=1e-6, atol=1e-6)


def test_pooling_caffe_size_rule():
    assert caffe_pool_size(10, 3, 2, 0) == 5  # MXNet valid gives 4
    assert caffe_pool_size(9, 3, 2, 0) == 4
    assert [ly.type for ly in to_caffe(_pool_graph(9)).layer] == ["Input", "Pooling"]  # exact: as it is
    # MXNet floors to 4, Caffe ceils to 5: Slices keep the first 4 rows and columns (the windows MXNet computes)
    net = to_caffe(_pool_graph(10))
    slices = [ly for ly in net.layer if ly.type == "Slice"]
    assert [(ly.slice_param.axis, list(ly.slice_param.slice_point)) for ly in slices] == [(2, [4]), (3, [4])]
    assert slices[-1].top[0] == "pool" and net.layer[1].top[0] != "pool"
    with pytest.raises(UnsupportedOpError, match="pool.*MXNet gives 5, Caffe .ceil. gives 5 or other tail"):
        to_caffe(_pool_graph(10, pooling_convention="full", pool_type="avg"))
    with pytest.raises(UnsupportedOpError, match="count_include_pad=True"):
        to_caffe(_pool_graph(10, pad=(1, 1), pool_type="avg"))


# ------------------------------------------------------------------------------------------------ CLI
def _fp32_files(tmp_path, name="resnet20"):
    """A structural-name MXNet json/params pair and a matching scale file of the quantized net."""
    net = get_trained(name, verbose=False)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, balanced_images(5))
    from deployq.exporters.ir.frontend import from_gluon

    sym, args, aux = mxnet_lower.to_symbol(from_gluon(net))
    (tmp_path / "m-symbol.json").write_text(sym.tojson())
    mx.nd.save(str(tmp_path / "m-0000.params"), {**{f"arg:{k}": v for k, v in args.items()},
                                                   **{f"aux:{k}": v for k, v in aux.items()}})
    (tmp_path / "s.json").write_text(json.dumps(deployq.export_scales(net, name)))
    return net


def test_cli_byte_identical_and_file_route(tmp_path, capsys):
    assert main(["export-ncnn", "--model", "mobilenet0.25", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert main(["export-ncnn", "--model", "mobilenet0.25", "--out", str(tmp_path / "b")]) == 0
    a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert a == sorted(["deployq-export.json", "USAGE.txt", "mobilenet0.25-qnet.deployq.json",
                        "mobilenet0.25-qnet.params"]
                      + [f"mobilenet0.25{s}" for s in SUFFIXES.values()])
    assert sorted(ln.split()[1].rsplit("/", 1)[1] for ln in printed) == a  # every file written is printed
    assert {ln.split()[0] for ln in printed} >= {"int8_param", "manifest", "qnet_params", "qnet_meta"}
    assert a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    net = _fp32_files(tmp_path)
    args = ["export-ncnn", "--symbol", str(tmp_path / "m-symbol.json"), "--params", str(tmp_path / "m-0000.params"),
            "--scales", str(tmp_path / "s.json"), "--input-shape", "1,3,32,32", "--out", str(tmp_path / "c")]
    capsys.readouterr()
    assert main(args) == 0
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == sorted(["deployq-export.json", "USAGE.txt", "m-symbol.json", "m-0000.params"]
                           + [f"m{s}" for s in SUFFIXES.values()])
    assert sorted(ln.split()[1].rsplit("/", 1)[1] for ln in capsys.readouterr().out.splitlines()) == files
    assert (tmp_path / "c" / "m-0000.params").read_bytes() == (tmp_path / "m-0000.params").read_bytes()
    man = json.loads((tmp_path / "c" / "deployq-export.json").read_text())
    assert man["engine"] == "ncnn" and "qnet" not in man["files"] and man["files"]["symbol"] == "m-symbol.json"
    assert set(man["layers"]) == set(deployq.quant_layers(net))
    x = balanced_images(3, "test")
    out = run(tmp_path / "c" / "m-int8.param", tmp_path / "c" / "m-int8.bin", x)
    sim = deployq.zoo.predict(net, x)
    assert np.mean(out.argmax(1) == sim.argmax(1)) == 1.0


def _table_lines(path) -> dict[str, list[float]]:
    return {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in path.read_text().splitlines()}


def test_cli_model_with_scale_file_and_config(tmp_path, capsys):
    """--model --scales: the file's thresholds go into the table (not min-max); --config: excluded layers get
    neither table line and stay fp32; the export verifies in ncnn; --scales/--config with --qnet are refused."""
    from deployq import calib
    from deployq.sensitivity import config_keeping_fp32
    from deployq.verify import verify

    sf = calib.calibrate(get_trained("resnet20", verbose=False), balanced_images(5), method="percentile",
                         profile="ncnn", quiet=True, model_name="resnet20", percentile=99.9)
    sf.save(tmp_path / "s.json")
    fp32_layer = "features.3.1.body.0"
    (tmp_path / "cfg.json").write_text(json.dumps(config_keeping_fp32([fp32_layer])))
    out = tmp_path / "o"
    assert main(["export-ncnn", "--model", "resnet20", "--scales", str(tmp_path / "s.json"), "--config",
                 str(tmp_path / "cfg.json"), "--out", str(out)]) == 0
    table = _table_lines(out / "resnet20.table")
    assert fp32_layer not in table and f"{fp32_layer}_param_0" not in table
    clipped = 0
    for key, r in sf.tensors.items():
        layer = key.removesuffix(":input")
        if layer == fp32_layer:
            continue
        assert np.float32(table[layer][0]) == np.float32(127) / np.float32(r.threshold), layer
        clipped += r.threshold < max(abs(r.observed_min), abs(r.observed_max)) * 0.999
    assert clipped >= 5  # the percentile thresholds are not the min-max ones: the file was applied
    line = next(ln for ln in (out / "resnet20-int8.param").read_text().splitlines() if f" {fp32_layer} " in ln)
    assert " 8=" not in line
    rep = verify(out, limit=100)
    assert rep["passed"], rep["breaches"]
    assert fp32_layer not in {r["layer"] for r in rep["layers"]} and len(rep["layers"]) == 21

    capsys.readouterr()
    qnet = str(out / "resnet20-qnet")
    assert main(["export-ncnn", "--qnet", qnet, "--scales", str(tmp_path / "s.json"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--scales does not apply to --qnet" in capsys.readouterr().err
    assert main(["export-ncnn", "--qnet", qnet, "--config", str(tmp_path / "cfg.json"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--config does not apply to --qnet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    other = calib.calibrate(get_trained("mobilenet0.25", verbose=False), balanced_images(1), method="minmax",
                            profile="ncnn", quiet=True)
    other.save(tmp_path / "other.json")
    assert main(["export-ncnn", "--model", "resnet20", "--scales", str(tmp_path / "other.json"),
                 "--out", str(tmp_path / "x")]) == 3  # bad input (deployq.errors)
    assert "different model" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_export_is_atomic(tmp_path, monkeypatch):
    """An error while saving the net, or while writing any file, leaves no file and no new folder."""
    net = get_trained("mobilenet0.25", verbose=False)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, balanced_images(2))

    def broken_save(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(deployq, "save", broken_save)
        with pytest.raises(RuntimeError, match="disk full"):
            export_qnet(net, tmp_path / "a", "m")
    assert not (tmp_path / "a").exists()
    export_qnet(net, tmp_path / "b", "m")  # a previous good export, which a failed re-export leaves as it was
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    calls = []
    real = type(tmp_path).write_bytes

    def flaky(self, data):
        calls.append(self.parent.name)
        if len(calls) == 6:
            raise OSError("disk full")
        return real(self, data)

    with monkeypatch.context() as m:
        m.setattr(type(tmp_path), "write_bytes", flaky)
        with pytest.raises(OSError, match="disk full"):
            export_qnet(net, tmp_path / "b", "m")
    assert len(calls) == 6 and all(c.startswith(".b.deployq-tmp-") for c in calls)  # the temporary folder only
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder, no lock file left


@pytest.mark.parametrize("damage", ["truncated", "nan", "numpy", "other_scales", "unsupported"])
def test_cli_bad_inputs(tmp_path, capsys, damage):
    _fp32_files(tmp_path)
    sym, params, scales = tmp_path / "m-symbol.json", tmp_path / "m-0000.params", tmp_path / "s.json"
    if damage == "truncated":
        params.write_bytes(params.read_bytes()[:5000])
        want = "corrupt or truncated"
    elif damage == "nan":
        d = mx.nd.load(str(params))
        k = next(k for k in d if k.endswith("weight"))
        d[k][:] = np.nan
        mx.nd.save(str(params), d)
        want = "NaN"
    elif damage == "numpy":
        raw = bytearray(params.read_bytes())
        raw[24:28] = (0xF993FACA).to_bytes(4, "little")
        params.write_bytes(bytes(raw))
        want = "numpy-mode"
    elif damage == "other_scales":
        other = get_trained("mobilenet0.25", verbose=False)
        deployq.quantize(other, profile="ncnn")
        doc = deployq.export_scales(other, "mobilenet0.25")
        for t in doc["tensors"].values():  # plausible ranges (an uncalibrated net's zero thresholds are refused)
            t.update(threshold=1.0, step=1 / 127, lo=-1.0, hi=1.0)
        scales.write_text(json.dumps(doc))
        want = "another model"
    else:
        js = json.loads(sym.read_text())
        js["nodes"][-1]["op"] = "arccos"
        sym.write_text(json.dumps(js))
        want = "unsupported op arccos"
    out = tmp_path / "out"
    rc = main(["export-ncnn", "--symbol", str(sym), "--params", str(params), "--scales", str(scales),
               "--input-shape", "1,3,32,32", "--out", str(out)])
    assert rc != 0
    assert want in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_scale_file_weight_codes_are_ncnn2int8_codes():
    """attach_scales' max-abs codes equal ncnn2int8's float2int8(W * 127/max|W|) (was all zeros)."""
    from deployq.exporters.ir.qattach import weight_quant_maxabs
    from deployq.exporters.ncnn.lower import float2int8

    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    wq = weight_quant_maxabs(w)
    m = wq.multiplier().reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(wq.codes, float2int8(w * m).astype(np.int32))
    assert np.abs(wq.codes).reshape(4, -1).max(1).tolist() == [127] * 4


class _SE(gluon.HybridBlock):
    """conv -> squeeze-excitation (global pool, 1x1 convs, sigmoid, broadcast_mul) -> dense."""

    def __init__(self):
        super().__init__()
        self.conv = gluon.nn.Conv2D(8, 3, padding=1, in_channels=3)
        self.fc1 = gluon.nn.Conv2D(4, 1, in_channels=8)
        self.fc2 = gluon.nn.Conv2D(8, 1, in_channels=4)
        self.out = gluon.nn.Dense(10, in_units=8 * 8 * 8)

    def hybrid_forward(self, F, x):
        y = F.Activation(self.conv(x), act_type="relu")
        s = F.Pooling(y, global_pool=True, pool_type="avg", kernel=(1, 1))
        s = F.Activation(self.fc2(F.Activation(self.fc1(s), act_type="relu")), act_type="sigmoid")
        return self.out(F.broadcast_mul(y, s))


def _se_net():
    mx.random.seed(0)
    net = _SE()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net.hybridize()
    return net, np.random.default_rng(0).normal(size=(40, 3, 8, 8)).astype(np.float32)


def test_se_block_fp32_and_int8(tmp_path):
    net, x = _se_net()
    ref = net(mx.nd.array(x)).asnumpy()
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, x)
    g, gq = qnet_graphs(net, "se", (1, 3, 8, 8))
    for key, graph, want, tol in (("fp32", g, ref, 1e-5), ("int8", gq, deployq.zoo.predict(net, x), 1e-4)):
        m = lower(graph, int8=key == "int8")
        assert [ly.type for ly in m.layers].count("InnerProduct") == 3  # 1x1 convs on the pooled vector + dense
        (tmp_path / f"{key}.param").write_text(param_text(m))
        (tmp_path / f"{key}.bin").write_bytes(bin_bytes(m))
        out = run(tmp_path / f"{key}.param", tmp_path / f"{key}.bin", x)
        rel = np.abs(out - want).max(1) / np.abs(want).max()
        assert np.mean(rel <= tol) >= 0.9 and rel.max() <= 1e-2, key  # int8: rare one-code rounding flips
    # Caffe: the SE 1x1 convs as InnerProduct, broadcast_mul as a two-bottom Scale over axes 0-1
    caffe = {ly.name: ly for ly in to_caffe(gq).layer}
    assert caffe["fc1"].type == caffe["fc2"].type == "InnerProduct"
    mul = next(ly for ly in caffe.values() if ly.type == "Scale")
    assert list(mul.bottom) == ["conv", "fc2"] and mul.scale_param.axis == 0 and not mul.blobs
    files = export_qnet(net, tmp_path / "e", "se", (1, 3, 8, 8))  # the whole export, Caffe pair included
    assert files["prototxt"].exists() and files["caffemodel"].exists()


class _Unpoolable(gluon.HybridBlock):
    """A hard-swish: ncnn runs it (HardSwish), Caffe has no such layer."""

    def __init__(self):
        super().__init__()
        self.conv = gluon.nn.Conv2D(4, 3, padding=1, in_channels=3)
        self.out = gluon.nn.Dense(10, in_units=4 * 10 * 10)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        return self.out(y * (F.clip(y + 3, 0, 6) / 6))


def test_caffe_unsupported_skips_the_pair_with_a_warning(tmp_path):
    from deployq.exporters.ncnn.export import CaffeSkippedWarning

    mx.random.seed(0)
    net = _Unpoolable()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x = np.random.default_rng(0).normal(size=(20, 3, 10, 10)).astype(np.float32)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, x)
    with pytest.warns(CaffeSkippedWarning, match=r"not written: .*unsupported op HardSwish"):
        files = export_qnet(net, tmp_path, "u", (1, 3, 10, 10))
    assert "prototxt" not in files and not list(tmp_path.glob("*.prototxt"))
    assert {"table", "fp32_param", "int8_param", "manifest"} <= set(files)
    man = json.loads(files["manifest"].read_text())
    assert "prototxt" not in man["files"] and man["files"]["table"] == "u.table"
    out = run(files["int8_param"], files["int8_bin"], x)
    assert np.mean(out.argmax(1) == deployq.zoo.predict(net, x).argmax(1)) == 1.0


def test_cli_saved_qnet_route(tmp_path):
    net = get_trained("resnet20", verbose=False)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, balanced_images(5))
    deployq.save(net, tmp_path / "r20", model_name="resnet20")
    assert main(["export-ncnn", "--qnet", str(tmp_path / "r20"), "--out", str(tmp_path / "o")]) == 0
    direct = export_qnet(net, tmp_path / "d", "r20")
    for key in ("table", "int8_param", "int8_bin", "caffemodel"):
        assert (tmp_path / "o" / direct[key].name).read_bytes() == direct[key].read_bytes(), key


def test_dead_channel_multiplier_zero(tmp_path):
    """A channel with all-zero folded weights: table multiplier 0, ncnn outputs the bias there."""
    mx.random.seed(1)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=3), gluon.nn.Dense(3, in_units=4 * 6 * 6))
    net.initialize(mx.init.Xavier())
    w = net[0].weight.data().asnumpy()
    w[2] = 0
    net[0].weight.set_data(mx.nd.array(w))
    net.hybridize()
    x = np.random.default_rng(1).normal(size=(20, 3, 6, 6)).astype(np.float32)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, x)
    _, gq = qnet_graphs(net, "dead", (1, 3, 6, 6))
    files = export_qnet(net, tmp_path, "dead", (1, 3, 6, 6))
    weights, _ = read_table(files["table"].read_text())
    assert weights["0_param_0"][2] == 0.0 and all(v > 0 for i, v in enumerate(weights["0_param_0"]) if i != 2)
    out = run(files["int8_param"], files["int8_bin"], x, output_blob="0")
    bias = gq.param(gq.node("0"), "bias")
    np.testing.assert_allclose(out.reshape(20, 4, 36)[:, 2], np.broadcast_to(bias[2], (20, 36)), rtol=1e-6)
