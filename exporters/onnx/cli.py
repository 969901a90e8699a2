"""``deployq export-onnx``: a saved quantized net, or an fp32 model with a scale file -> an ONNX export directory."""

from __future__ import annotations

import argparse

from deployq import preprocess
from deployq.errors import UsageError
from deployq.images import add_data_arguments
from deployq.modelargs import add_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-onnx", help="export a quantized net to ONNX (QDQ) + fp32 ONNX + manifest",
        description="Export to OUT: model.onnx (QuantizeLinear/DequantizeLinear on deployq's grids), "
                    "model.fp32.onnx, scales.json, the saved net, USAGE.txt and deployq-export.json. The model is a "
                    "saved quantized net (--qnet, e.g. from deployq qat), or an fp32 --model/--symbol with the "
                    "--scales of deployq calibrate (quantized on the scale file's profile).")
    p.add_argument("qnet_pos", nargs="?", metavar="QNET", help="same as --qnet PATH")
    add_model_arguments(p)
    p.add_argument("--scales", help="--model/--symbol: the scale file of deployq calibrate (its profile, its ranges)")
    add_data_arguments(p, help_text="--model/--symbol under a profile that quantizes layer outputs (onnx): images "
                                    "to calibrate those outputs (min-max); a folder or an .npz")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--model-name", default=None, help="name in the manifest (default: the model's)")
    p.add_argument("--no-fp32", action="store_true", help="do not write model.fp32.onnx")
    preprocess.add_arguments(p)
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print a JSON summary (written files, model, input shape) instead of the file list")
    p.set_defaults(func=run)


def _quantized(args: argparse.Namespace, m):
    import warnings

    import deployq
    from deployq import calib

    if not args.scales:
        raise UsageError(f"no --scales: the fp32 model {m.name} needs calibrated ranges",
                         fix="run deployq calibrate --profile onnx with this model and --data DIR, then pass "
                             "--scales FILE (or export a --qnet)")
    sf = calib.load(args.scales)
    deployq.quantize(m.net, profile=sf.profile or "onnx")
    calib.apply(m.net, sf)
    unset = [p for p, b in deployq.quant_layers(m.net).items()
             if b.layer_config.output is not None and b.output_range() is None]
    if unset or deployq.api.output_quantizers(m.net):
        if not args.data:
            raise UsageError(f"profile {sf.profile} quantizes layer outputs, which the scale file does not hold",
                             fix="pass --data DIR: deployq min-max calibrates them on your images")
        from deployq.images import open_data
        from deployq.layerwise import calibrate_outputs

        x = open_data(args.data, m.preprocess, limit=args.limit or 256, skip_bad=args.skip_bad_images).x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrate_outputs(m.net, x)
    return m.net


def run(args: argparse.Namespace) -> int:
    from deployq.exporters.onnx.export import export_qnet

    from deployq.atomic import check_target
    from deployq.modelargs import load_model

    check_target(args.out)  # before any work: an --out that cannot hold an export is refused
    if args.qnet_pos:
        if args.qnet or args.model or args.symbol:
            raise UsageError(f"give the model once: {args.qnet_pos!r} and --qnet/--model/--symbol")
        args.qnet = args.qnet_pos
    if args.qnet and args.scales:
        raise UsageError("--scales does not apply to --qnet: a saved quantized net carries its own ranges")
    m = load_model(args, preprocess.from_scale_file(args.scales), quiet=True)
    net = m.net if m.quantized else _quantized(args, m)
    files = export_qnet(net, args.out, args.model_name or m.name, fp32=not args.no_fp32, preprocess=m.preprocess)
    if args.json_out:
        import json

        print(json.dumps({"engine": "onnxruntime", "model": args.model_name or m.name,
                          "input_shape": list(m.preprocess.input_shape),
                          "files": {k: str(v) for k, v in files.items()}}, indent=2))
        return 0
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0
