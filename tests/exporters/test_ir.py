"""Front ends and the MXNet executor: round trips reproduce the Gluon net; bad inputs give clear errors."""

from __future__ import annotations

import json
import re

import mxnet as mx
import numpy as np
import pytest
from deployq.exporters.ir.frontend import from_files, from_gluon
from deployq.exporters.ir.graph import GraphError, UnsupportedOpError
from deployq.exporters.ir.mxnet_lower import run
from mxnet import gluon

from .conftest import MODELS, random_net, rel_err


def _gluon_out(net, x):
    return net(mx.nd.array(x)).asnumpy()


@pytest.mark.parametrize("name", MODELS)
def test_roundtrip_random(name):
    net = random_net(name)
    x = np.random.default_rng(1).normal(size=(8, 3, 32, 32)).astype(np.float32)
    g = from_gluon(net, name=name)
    ref = _gluon_out(net, x)
    assert np.abs(ref).max() > 1e-3  # a non-degenerate reference
    assert rel_err(run(g, x)[g.outputs[0]], ref) <= 1e-5


def test_roundtrip_trained(trained, test_images):
    name, net = trained
    x = test_images[:200]
    g = from_gluon(net, name=name)
    assert rel_err(run(g, x)[g.outputs[0]], _gluon_out(net, x)) <= 1e-5


def test_structural_names():
    g = from_gluon(random_net("resnet20"))
    names = [n.name for n in g.nodes]
    assert names[:2] == ["features.0", "features.1"]
    assert "features.2.0.body.0" in names and g.outputs == ["output"]
    assert g.node("features.0").params == {"weight": "features.0.weight"}
    bn = g.node("features.1").attrs
    assert bn["eps"] == pytest.approx(1e-5) and bn["fix_gamma"] is False
    assert len(set(names)) == len(names)
    assert "features.0" in g.dump()


@pytest.mark.parametrize("name", MODELS)
def test_from_files_matches_gluon(tmp_path, name):
    net = random_net(name)
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.export(str(tmp_path / name))
    x = np.random.default_rng(2).normal(size=(4, 3, 32, 32)).astype(np.float32)
    g = from_files(tmp_path / f"{name}-symbol.json", tmp_path / f"{name}-0000.params")
    assert g.name == name
    assert rel_err(run(g, x)[g.outputs[0]], _gluon_out(net, x)) <= 1e-5
    assert all(v.dtype == np.float32 for v in g.params.values())


class _Odd(gluon.HybridBlock):
    def __init__(self, which: str):
        super().__init__()
        self.which = which
        self.conv = gluon.nn.Conv2D(4, 3, in_channels=3)

    def hybrid_forward(self, F, x):
        y = self.conv(x)
        return F.arccos(y) if self.which == "arccos" else F.tanh(y)


@pytest.mark.parametrize("which,op", [("arccos", "arccos"), ("tanh", "tanh")])
def test_unsupported_op(which, op):
    net = _Odd(which)
    net.initialize()
    with pytest.raises(UnsupportedOpError) as e:
        from_gluon(net)
    msg = str(e.value)
    assert f"unsupported op {op}" in msg and "supported ops: Convolution" in msg and "_odd" in msg.lower()


def _export_small(tmp_path, name="small"):
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=3), gluon.nn.BatchNorm(), gluon.nn.Activation("relu"),
            gluon.nn.GlobalAvgPool2D(), gluon.nn.Dense(3))
    net.initialize()
    net.hybridize()
    net(mx.nd.zeros((1, 3, 32, 32)))
    net.export(str(tmp_path / name))
    return tmp_path / f"{name}-symbol.json", tmp_path / f"{name}-0000.params"


def test_from_files_unsupported_op_names_file(tmp_path):
    js, ps = _export_small(tmp_path)
    d = json.loads(js.read_text())
    act = next(n for n in d["nodes"] if n["op"] == "Activation")
    act["op"], act["attrs"] = "hard_sigmoid", {}
    js.write_text(json.dumps(d))
    msg = rf"{js.name}: node '{act['name']}'.*unsupported op hard_sigmoid"
    with pytest.raises(UnsupportedOpError, match=msg):
        from_files(js, ps)


def test_truncated_params(tmp_path):
    js, ps = _export_small(tmp_path)
    ps.write_bytes(ps.read_bytes()[:200])
    with pytest.raises(GraphError, match=rf"{ps.name}: corrupt or truncated"):
        from_files(js, ps)


def test_corrupt_params(tmp_path):
    js, ps = _export_small(tmp_path)
    ps.write_bytes(b"this is not an MXNet params file at all" * 4)
    with pytest.raises(GraphError, match=rf"{ps.name}: corrupt or truncated"):
        from_files(js, ps)


def test_numpy_mode_params(tmp_path):
    js, ps = _export_small(tmp_path)
    arrays = {k: v.asnumpy() for k, v in mx.nd.load(str(ps)).items()}
    mx.npx.set_np()
    try:
        mx.npx.save(str(ps), {k: mx.np.array(v) for k, v in arrays.items()})
    finally:
        mx.npx.reset_np()
    with pytest.raises(GraphError, match=r"numpy-mode params \(array magic 0xF993FACA"):
        from_files(js, ps)


def test_missing_param(tmp_path):
    js, ps = _export_small(tmp_path)
    arrays = mx.nd.load(str(ps))
    key = next(k for k in arrays if k.endswith("weight"))
    del arrays[key]
    mx.nd.save(str(ps), arrays)
    with pytest.raises(GraphError, match=rf"{ps.name}: missing param '{key.split(':')[1]}'"):
        from_files(js, ps)


def test_nan_weights(tmp_path):
    js, ps = _export_small(tmp_path)
    arrays = mx.nd.load(str(ps))
    key = next(k for k in arrays if k.endswith("weight"))
    w = arrays[key].asnumpy()
    w.flat[0] = np.nan
    arrays[key] = mx.nd.array(w)
    mx.nd.save(str(ps), arrays)
    with pytest.raises(GraphError, match=rf"{ps.name}: param '{key.split(':')[1]}' holds NaN"):
        from_files(js, ps)


def test_params_of_another_model(tmp_path):
    js, ps = _export_small(tmp_path)
    arrays = mx.nd.load(str(ps))
    key = next(k for k in arrays if "conv" in k and k.endswith("weight"))
    arrays[key] = mx.nd.ones((4, 3, 5, 5))
    mx.nd.save(str(ps), arrays)
    with pytest.raises(GraphError, match=rf"param '{key.split(':')[1]}' has shape \(4, 3, 5, 5\)"):
        from_files(js, ps)


def test_symbol_api_model_with_label_and_duplicate_names(tmp_path):
    """A Module-style symbol: SoftmaxOutput's label input is dropped, duplicated node names are made unique."""
    data = mx.sym.var("data")
    c1 = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv")
    c2 = mx.sym.Convolution(mx.sym.Activation(c1, act_type="relu", name="act"), num_filter=4, kernel=(1, 1),
                            no_bias=True, name="conv")
    fc = mx.sym.FullyConnected(mx.sym.Dropout(c2, p=0.3), num_hidden=3, name="fc")
    sym = mx.sym.SoftmaxOutput(fc, mx.sym.var("softmax_label"), name="softmax")
    rng = np.random.default_rng(0)
    args = {"conv_weight": rng.normal(size=(4, 3, 3, 3)), "conv_bias": rng.normal(size=4),
            "fc_weight": rng.normal(size=(3, 4 * 8 * 8)), "fc_bias": rng.normal(size=3)}
    sym.save(str(tmp_path / "m-symbol.json"))
    mx.nd.save(str(tmp_path / "m-0000.params"), {f"arg:{k}": mx.nd.array(v) for k, v in args.items()})
    # both convs read the param 'conv_weight' (same names); shapes differ -> a clear error
    with pytest.raises(GraphError, match="conv_weight"):
        from_files(tmp_path / "m-symbol.json", tmp_path / "m-0000.params", (1, 3, 8, 8))
    d = json.loads((tmp_path / "m-symbol.json").read_text())
    for n in d["nodes"]:
        if n["name"] == "conv_weight" and n is not next(m for m in d["nodes"] if m["name"] == "conv_weight"):
            n["name"] = "conv2_weight"
    (tmp_path / "m-symbol.json").write_text(json.dumps(d))
    args["conv2_weight"] = rng.normal(size=(4, 4, 1, 1))
    mx.nd.save(str(tmp_path / "m-0000.params"), {f"arg:{k}": mx.nd.array(v) for k, v in args.items()})
    g = from_files(tmp_path / "m-symbol.json", tmp_path / "m-0000.params", (1, 3, 8, 8))
    names = [n.name for n in g.nodes]
    assert len(set(names)) == len(names) and names[:3] == ["conv", "act", "conv_1"]
    assert g.node("softmax").op == "SoftmaxOutput" and g.node("softmax").inputs == ["fc"]
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    ref_sym = mx.sym.load(str(tmp_path / "m-symbol.json"))
    feed = {k: mx.nd.array(v) for k, v in args.items()}
    exe = ref_sym.bind(mx.cpu(), {**feed, "data": mx.nd.array(x), "softmax_label": mx.nd.zeros(2)})
    ref = exe.forward(is_train=False)[0].asnumpy()
    assert rel_err(run(g, x)[g.outputs[0]], ref) <= 1e-5


def _edit_conv_layout(d):
    conv = next(n for n in d["nodes"] if n["op"] == "Convolution")
    conv["attrs"]["layout"] = "NHWC"
    return rf"node '{conv['name']}'.*unsupported op Convolution \(layout NHWC \(only NCHW\)\)"


def _edit_bad_attr(d):
    conv = next(n for n in d["nodes"] if n["op"] == "Convolution")
    conv["attrs"]["kernel"] = "(3, x)"
    return rf"node '{conv['name']}'.*op Convolution: cannot parse attr kernel='\(3, x\)'"


def _edit_no_data(d):
    next(n for n in d["nodes"] if n["name"] == "data")["name"] = "input0"
    return "no graph input named 'data'"


def _edit_second_output(d):
    bn = next(i for i, n in enumerate(d["nodes"]) if n["op"] == "BatchNorm")
    act = next(n for n in d["nodes"] if n["op"] == "Activation")
    act["inputs"] = [[bn, 1, 0]]
    return rf"node '{act['name']}': op Activation reads output 1 of node"


def _edit_not_symbol(d):
    d.pop("heads")
    return "not an MXNet symbol JSON"


@pytest.mark.parametrize("edit", [_edit_conv_layout, _edit_bad_attr, _edit_no_data, _edit_second_output,
                                  _edit_not_symbol])
def test_json_error_paths(tmp_path, edit):
    js, ps = _export_small(tmp_path)
    d = json.loads(js.read_text())
    msg = edit(d)
    js.write_text(json.dumps(d))
    with pytest.raises((GraphError, UnsupportedOpError)) as e:
        from_files(js, ps)
    assert js.name in str(e.value) and re.search(msg, str(e.value)), str(e.value)


def test_non_hybrid_net():
    class _Plain(gluon.Block):
        def forward(self, x):
            return x

    with pytest.raises(GraphError, match="_Plain: not a gluon.HybridBlock"):
        from_gluon(_Plain())
