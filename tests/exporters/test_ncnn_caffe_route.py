"""The Caffe + table route, through a Python emulation of caffe2ncnn + ncnn2int8 (spec ncnn-int8.md §3/§4/§7;
the real tools have no PyPI binaries), run in ncnn's runtime and compared with the direct int8 model.

This checks that the Caffe files carry every weight and parameter caffe2ncnn reads and that the table's keys
and multipliers give ncnn2int8 the direct model's codes; it cannot check caffe2ncnn itself."""

from __future__ import annotations

import numpy as np
import pytest
from deployq.exporters.ncnn import caffe_pb2 as pb
from deployq.exporters.ncnn.export import balanced_images, export_qnet, minmax_calibrate
from deployq.exporters.ncnn.lower import FP32_TAG, INT8_TAG, LayerRecord, NcnnModel, WeightBlob, float2int8
from deployq.exporters.ncnn.runtime import run
from deployq.exporters.ncnn.write import bin_bytes, param_text
from google.protobuf import text_format

import deployq
from deployq.data import load_mnist5k
from deployq.zoo import get_trained

from .conftest import MODELS
from .test_ncnn_files import read_table


def _hw(p, name: str, default: int) -> tuple[int, int]:
    rep = list(getattr(p, name)) if name in ("kernel_size", "stride", "pad") else None
    base = name.split("_")[0]
    h, w = getattr(p, f"{base}_h", 0), getattr(p, f"{base}_w", 0)
    if h or w:
        return h, w
    v = (rep[0] if rep else default) if rep is not None else default
    return v, v


def caffe2ncnn(arch: pb.NetParameter, weights: pb.NetParameter) -> NcnnModel:
    """caffe2ncnn's mapping for the layer types deployq writes (in-place tops renamed, Splits inserted)."""
    blobs = {ly.name: ly.blobs for ly in weights.layer}
    layers, current = [], {}
    for ly in arch.layer:
        bottoms = [current[b] for b in ly.bottom]
        tops = []
        for t in ly.top:
            renamed = f"{t}_{ly.name}" if t in ly.bottom else t
            current[t] = renamed
            tops.append(renamed)
        arr = [np.array(b.data, np.float32).reshape(tuple(b.shape.dim)) for b in blobs[ly.name]]
        rec = LayerRecord(ly.type, ly.name, bottoms, tops)
        if ly.type == "Input":
            n, c, h, w = ly.input_param.shape[0].dim
            rec.params = {0: w, 1: h, 2: c}
        elif ly.type == "Convolution":
            p = ly.convolution_param
            (kh, kw), (sh, sw), (ph, pw) = _hw(p, "kernel_size", 1), _hw(p, "stride", 1), _hw(p, "pad", 0)
            d = p.dilation[0] if p.dilation else 1
            rec.params = {0: p.num_output, 1: kw, 11: kh, 2: d, 12: d, 3: sw, 13: sh, 4: pw, 14: ph,
                          5: int(p.bias_term), 6: int(arr[0].size)}
            if p.group != 1:
                rec.type, rec.params[7] = "ConvolutionDepthWise", p.group
            rec.weights = [WeightBlob(arr[0], FP32_TAG)] + [WeightBlob(a) for a in arr[1:]]
        elif ly.type == "InnerProduct":
            p = ly.inner_product_param
            rec.params = {0: p.num_output, 1: int(p.bias_term), 2: int(arr[0].size)}
            rec.weights = [WeightBlob(arr[0], FP32_TAG)] + [WeightBlob(a) for a in arr[1:]]
        elif ly.type == "ReLU6":
            rec.type, rec.params = "Clip", {0: 0.0, 1: 6.0}
        elif ly.type == "Pooling":
            p = ly.pooling_param
            rec.params = {0: int(p.pool), 4: int(p.global_pooling), 5: 0}
            if not p.global_pooling:
                (kh, kw), (sh, sw), (ph, pw) = _hw(p, "kernel_size", 1), _hw(p, "stride", 1), _hw(p, "pad", 0)
                rec.params.update({1: kw, 11: kh, 2: sw, 12: sh, 3: pw, 13: ph, 14: pw, 15: ph})
        elif ly.type == "Eltwise":
            rec.params = {0: int(ly.eltwise_param.operation)}
        elif ly.type == "Softmax":
            rec.params = {0: ly.softmax_param.axis - 1, 1: 1}
        elif ly.type == "Concat":
            rec.params = {0: ly.concat_param.axis - 1}
        elif ly.type == "Scale":  # no weight blob (two bottoms): 0=-233, scale from the second blob
            bias = int(ly.scale_param.bias_term)
            has_weight = len(arr) == 1 + bias
            rec.params = {0: int(arr[0].size) if has_weight else -233, 1: bias}
            rec.weights = [WeightBlob(a) for a in arr]
        elif ly.type not in ("ReLU", "Flatten", "Sigmoid", "TanH"):
            raise NotImplementedError(ly.type)
        layers.append(rec)
    out: list[LayerRecord] = []
    k = 0
    for rec in layers:  # Split for every blob read by several layers
        out.append(rec)
        for t in rec.tops:
            users = [(u, i) for u in layers for i, b in enumerate(u.bottoms) if b == t]
            if len(users) > 1:
                names = [f"{t}_splitncnn_{j}" for j in range(len(users))]
                out.append(LayerRecord("Split", f"splitncnn_{k}", [t], names))
                k += 1
                for (u, i), nm in zip(users, names, strict=True):
                    u.bottoms[i] = nm
    return NcnnModel(out, "data", [out[-1].tops[0]])


def ncnn2int8(model: NcnnModel, table: str) -> NcnnModel:
    """ncnn2int8's weight quantization from the table (no requantize fusion, no fp16 rewrite)."""
    weights, blobs = read_table(table)
    for ly in model.layers:
        if ly.type not in ("Convolution", "ConvolutionDepthWise", "InnerProduct") or ly.name not in blobs:
            continue
        ws = np.array(weights[f"{ly.name}_param_0"], np.float32)
        w = ly.weights[0].data
        per_out = np.repeat(ws, w.shape[0] // len(ws))
        codes = float2int8(w * per_out.reshape((-1,) + (1,) * (w.ndim - 1)))
        ly.params[8] = 1 if ly.type == "ConvolutionDepthWise" else 2
        ly.weights = [WeightBlob(codes, INT8_TAG), *ly.weights[1:], WeightBlob(ws),
                      WeightBlob(np.array(blobs[ly.name], np.float32))]
    return model


@pytest.mark.parametrize("name", MODELS)
def test_caffe_route_computes_the_direct_int8_model(tmp_path, name):
    net = get_trained(name, verbose=False)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, balanced_images(10))
    files = export_qnet(net, tmp_path, name)
    arch = text_format.Parse(files["prototxt"].read_text(), pb.NetParameter())
    weights = pb.NetParameter()
    weights.ParseFromString(files["caffemodel"].read_bytes())
    model = ncnn2int8(caffe2ncnn(arch, weights), files["table"].read_text())
    assert sum(ly.params.get(8, 0) > 0 for ly in model.layers) == len(deployq.quant_layers(net))
    (tmp_path / "c.param").write_text(param_text(model))
    (tmp_path / "c.bin").write_bytes(bin_bytes(model))
    x = load_mnist5k("test").x[:300]
    via_caffe = run(tmp_path / "c.param", tmp_path / "c.bin", x, output_blob=model.output_blobs[0])
    direct = run(files["int8_param"], files["int8_bin"], x)
    assert np.mean(via_caffe.argmax(1) == direct.argmax(1)) == 1.0
    per_image = np.abs(via_caffe - direct).max(1)
    print(f"{name}: caffe route vs direct int8: max logit difference {per_image.max():.3g}")
    assert per_image.max() <= 1e-5  # observed: identical (requantize fusion gives the same codes)


def test_caffe_route_squeeze_excitation(tmp_path):
    """SE: caffe2ncnn's two-bottom Scale (0=-233) and InnerProduct on the pooled blob run in ncnn: fp32 equals
    MXNet, int8 through ncnn2int8 equals the direct int8 model."""
    import mxnet as mx

    from .test_ncnn_files import _se_net

    net, x = _se_net()
    ref = net(mx.nd.array(x)).asnumpy()
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, x)
    files = export_qnet(net, tmp_path, "se", (1, 3, 8, 8))
    arch = text_format.Parse(files["prototxt"].read_text(), pb.NetParameter())
    weights = pb.NetParameter()
    weights.ParseFromString(files["caffemodel"].read_bytes())
    fp32 = caffe2ncnn(arch, weights)
    scale = next(ly for ly in fp32.layers if ly.type == "Scale")
    assert scale.params == {0: -233, 1: 0} and len(scale.bottoms) == 2
    (tmp_path / "f.param").write_text(param_text(fp32))
    (tmp_path / "f.bin").write_bytes(bin_bytes(fp32))
    out = run(tmp_path / "f.param", tmp_path / "f.bin", x, output_blob=fp32.output_blobs[0])
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    int8 = ncnn2int8(caffe2ncnn(arch, weights), files["table"].read_text())
    assert sum(ly.params.get(8, 0) > 0 for ly in int8.layers) == 4
    (tmp_path / "c.param").write_text(param_text(int8))
    (tmp_path / "c.bin").write_bytes(bin_bytes(int8))
    via_caffe = run(tmp_path / "c.param", tmp_path / "c.bin", x, output_blob=int8.output_blobs[0])
    direct = run(files["int8_param"], files["int8_bin"], x)
    assert np.abs(via_caffe - direct).max() <= 1e-5 * np.abs(direct).max()
