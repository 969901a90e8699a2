"""``deployq simulate`` end to end on resnet20 (cached fp32 on MNIST-5k) plus its option handling.

Measured (2 cores): fp32 97.80 %; 8-bit simulated (offline naive calibration) 97.80 % per-channel and per-layer,
with or without the first conv; uint8 inputs without excluding the first conv 10.10 % (the normalised MNIST
input is signed). The tests allow 1 pp at 8 bits.
"""

from __future__ import annotations

import re

import pytest

from deployq.cli import main
from deployq.simulate import SimOptions, build_config, format_table
from deployq.zoo import get_trained


def _run(capsys, *args: str) -> tuple[float, float, str]:
    rc = main(["simulate", "--model", "resnet20", "--quiet", "--show-config", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    fp32 = float(re.search(r"fp32 top-1:\s+([\d.]+)%", out).group(1))
    q = float(re.search(r"simulated top-1:\s+([\d.]+)%", out).group(1))
    return fp32, q, out


def _layer_row(out: str, layer: str) -> str:
    return next(line for line in out.splitlines() if line.split() and line.split()[0] == layer)


def test_simulate_8bit_end_to_end(capsys) -> None:
    fp32, q, out = _run(capsys, "--input-offline", "--quant-type", "channel", "--no-merge-bn")
    assert fp32 > 95.0
    assert abs(fp32 - q) <= 1.0, out
    assert "int8 channel" in _layer_row(out, "features.0")
    assert "int8 channel" in _layer_row(out, "output")

    fp32b, qb, outb = _run(capsys, "--input-offline", "--quant-type", "layer", "--exclude-first-conv")
    assert fp32b == fp32
    assert abs(fp32 - qb) <= 1.0, outb
    first = _layer_row(outb, "features.0")
    assert "fp32" in first and "excluded" in first
    assert "int8 layer" in _layer_row(outb, "features.2.0.body.0")
    assert "features.2.0.body.1" in _layer_row(outb, "features.2.0.body.0")  # --merge-bn is the custom default


def test_unsigned_input_without_exclusion_breaks_first_conv(capsys) -> None:
    # MNIST inputs are normalised (background -0.42): unsigned [0, T] inputs clip them, as in the seed.
    fp32, q, _ = _run(capsys, "--input-offline", "--input-unsigned", "--no-merge-bn")
    assert q < fp32 - 20.0


def test_config_mapping() -> None:
    net = get_trained("resnet20", verbose=False)
    cfg = build_config(SimOptions(weight_bits=6, input_bits=5, input_signed=False, quant_type="group",
                                  exclude_first_conv=True, fake_bn=False), net)
    assert cfg[0]["quant_bits"] == {"weight": 6, "input": 5}
    assert cfg[0]["quant_dtype"]["input"] == "uint"
    assert cfg[0]["quant_scheme"]["weight"] == "per_group_symmetric"
    assert cfg[0]["input_mode"] == "online" and cfg[0]["fake_bn"] is False
    assert cfg[1] == {"op_names": ["features.0"], "exclude": True}


def test_bad_options(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--quant-type", "tensor"])
    assert e.value.code == 2
    assert "layer" in capsys.readouterr().err
    assert main(["simulate", "--profile", "ncnn", "--weight-bits", "9", "--quiet"]) == 3  # bad input (deployq.errors)
    err = capsys.readouterr().err
    assert "quant_bits" in err and "ncnn" in err
    assert main(["simulate", "--batch-size", "0", "--quiet"]) == 3
    assert "--batch-size" in capsys.readouterr().err


def test_format_table() -> None:
    row = {"IN dtype": "int8", "IN offline": True, "WT dtype": "int4", "WT qtype": "channel", "Merge BN": False,
           "w/o 1st conv": True, "Top-1": 0.9712, "fp32": 0.978}
    text = format_table([row])
    assert "| int8 | yes | int4 | channel | no | yes | 97.12% |" in text
    assert "fp32 top-1: 97.80%" in text
