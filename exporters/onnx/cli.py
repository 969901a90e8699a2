"""``deployq export-onnx``: a saved quantized net (``deployq.save``) -> an ONNX export directory."""

from __future__ import annotations

import argparse
import json


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; expected e.g. 1,3,32,32") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("export-onnx", help="export a quantized net to ONNX (QDQ) + fp32 ONNX + manifest",
                              description="Export a quantized net saved with deployq.save (<base>.params + "
                                          "<base>.deployq.json) to OUT: model.onnx (QuantizeLinear/"
                                          "DequantizeLinear on deployq's grids), model.fp32.onnx, scales.json, "
                                          "the saved net and deployq-export.json.")
    p.add_argument("qnet", help="base path of the saved quantized net (without .params)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--model-name", default=None, help="name in the manifest (default: the saved net's model)")
    p.add_argument("--input-shape", type=_shape, default=None, help="N,C,H,W (default: the saved net's)")
    p.add_argument("--no-fp32", action="store_true", help="do not write model.fp32.onnx")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deployq.exporters.onnx.export import export_qnet

    import deployq

    base = Path(args.qnet)
    # strip only our own suffixes: Path.suffix would take ".25-qat" of "mobilenet0.25-qat" for one
    stem = str(base).removesuffix(".params").removesuffix(".deployq.json")
    meta_path = Path(stem + ".deployq.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    qnet = deployq.load(base)
    name = args.model_name or meta.get("model") or "model"
    shape = args.input_shape or tuple(meta.get("input_shape", (1, 3, 32, 32)))
    files = export_qnet(qnet, args.out, name, shape, fp32=not args.no_fp32)
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0
