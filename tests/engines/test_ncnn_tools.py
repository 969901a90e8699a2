"""deployq's ncnn export through ncnn's own caffe2ncnn + ncnn2int8: the Caffe pair + table give the direct int8
model's logits exactly (the route the docs offer; the direct fp32 .param/.bin + table is not offered)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from deployq.exporters.ncnn.export import balanced_images, export_qnet, minmax_calibrate
from deployq.exporters.ncnn.runtime import run

import deployq
from deployq.data import load_mnist5k
from deployq.zoo import get_trained


def _last_top(param: Path) -> str:
    f = param.read_text().splitlines()[-1].split()
    return f[4 + int(f[2])]


@pytest.mark.parametrize("name", ["resnet20", "mobilenet0.25"])
def test_caffe_pair_through_the_tools_is_the_direct_int8_model(name, ncnn_bin, tmp_path):
    net = get_trained(name, verbose=False)
    deployq.quantize(net, profile="ncnn")
    minmax_calibrate(net, balanced_images(10))
    files = export_qnet(net, tmp_path / "export", name)
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run([ncnn_bin / "caffe2ncnn", files["prototxt"], files["caffemodel"], f"{a}.param", f"{a}.bin"],
                   check=True, capture_output=True)
    subprocess.run([ncnn_bin / "ncnn2int8", f"{a}.param", f"{a}.bin", f"{b}.param", f"{b}.bin", files["table"]],
                   check=True, capture_output=True)
    x = load_mnist5k("test").x[::25][:40]
    direct = run(files["int8_param"], files["int8_bin"], x)
    tools = run(f"{b}.param", f"{b}.bin", x, output_blob=_last_top(Path(f"{b}.param")))
    np.testing.assert_array_equal(tools, direct)
