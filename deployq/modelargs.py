"""One way to name a model on every command line: ``--model``, ``--symbol/--params`` or ``--qnet``.

- ``--model NAME``: a built-in MNIST model (cached fp32 weights) or any gluoncv classification model name
  (``--classes N``, default 1000; ``--params FILE`` from ``save_parameters``, else random weights, for trying);
- ``--symbol FILE --params FILE``: any MXNet export (``HybridBlock.export``), rebuilt as a :class:`SymbolNet`;
- ``--qnet PATH``: a quantized net saved by ``deployq qat`` / ``deployq.save`` (any architecture).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import check_net_batchnorm
from .errors import InputError, UsageError, short_message
from .preprocess import Preprocess, from_args, imagenet, mnist


def add_model_arguments(parser: argparse.ArgumentParser, *, qnet: bool = True, fp32: bool = True) -> None:
    g = parser.add_argument_group("model (give one of --model, --symbol, --qnet)")
    if fp32:
        g.add_argument("--model", metavar="NAME",
                       help="a built-in model (mobilenet0.25, resnet20: MNIST-trained, cached) or a gluoncv "
                            "classification model name (resnet18_v1, mobilenetv2_1.0, ...)")
        g.add_argument("--symbol", metavar="FILE", help="an MXNet symbol JSON (HybridBlock.export), with --params")
        g.add_argument("--params", metavar="FILE",
                       help="weights: the .params of --symbol, or save_parameters of a gluoncv --model")
        g.add_argument("--classes", type=int, default=None,
                       help="number of classes of a gluoncv --model (default 1000)")
    if qnet:
        g.add_argument("--qnet", metavar="PATH",
                       help="a saved quantized net (PATH.params + PATH.deployq.json from deployq qat / deployq.save)")


@dataclass
class LoadedModel:
    """A model named on the command line, ready to run."""

    net: Any
    name: str
    kind: str  # builtin | gluoncv | symbol | qnet
    preprocess: Preprocess
    quantized: bool = False
    profile: str | None = None
    classes: int | None = None
    symbol: Path | None = None
    params: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def default_shape(name: str) -> tuple[int, int, int, int]:
    """The input size a gluoncv model family is built for."""
    if name.startswith("cifar_"):
        return (1, 3, 32, 32)
    if name.startswith("inception"):
        return (1, 3, 299, 299)
    return (1, 3, 224, 224)


def _note(text: str) -> None:
    import sys

    print(f"deployq: note: {text}", file=sys.stderr)


def _given(args: argparse.Namespace) -> list[str]:
    return [f for f in ("model", "symbol", "qnet") if getattr(args, f, None)]


def load_model(args: argparse.Namespace, stored: Preprocess | None = None, *, quiet: bool = True,
               build_symbol: bool = True) -> LoadedModel:
    """The model of ``args`` with its preprocessing: the command line's options override ``stored`` (from a scale
    file), which overrides the qnet's, which overrides the model's default (MNIST's, or ImageNet's).
    ``build_symbol=False``: a --symbol model is not rebuilt as a SymbolNet (``net`` None; the exporters' json/params
    route reads the files itself)."""
    given = _given(args)
    if len(given) != 1:
        opts = "--model NAME, --symbol FILE --params FILE" + (", --qnet PATH" if hasattr(args, "qnet") else "")
        raise UsageError(("give one model: " if not given else f"give only one of --{' --'.join(given)}: ") + opts)
    if getattr(args, "classes", None) is not None and (not getattr(args, "model", None) or args.classes < 1):
        raise UsageError("--classes applies to a gluoncv --model and must be positive")
    if getattr(args, "qnet", None):
        if getattr(args, "params", None):
            raise UsageError("--params does not apply to --qnet (the saved net has its weights)")
        from .api import load_saved

        net, meta, pre = load_saved(args.qnet)
        pre = from_args(args, stored or pre)
        return LoadedModel(net, meta.get("model") or Path(args.qnet).name, "qnet", pre, True,
                           net._deployq["profile"], meta=meta)
    if getattr(args, "symbol", None):
        if not args.params:
            raise UsageError("--symbol needs --params (the .params file exported with it)")
        from .symbolnet import SymbolNet

        pre = from_args(args, stored)
        net = SymbolNet.from_files(args.symbol, args.params, pre.input_shape) if build_symbol else None
        if not (args.mean or args.std or stored):
            pre = from_args(args, imagenet(pre.input_shape))
            _note(f"no --mean/--std: using ImageNet's (mean {','.join(f'{v:g}' for v in pre.mean)}, std "
                  f"{','.join(f'{v:g}' for v in pre.std)}, rgb, resize {pre.resize})")
        name = Path(args.symbol).name.removesuffix(".json").removesuffix("-symbol")
        check_net_batchnorm(net, args.params)  # a negative / non-finite moving_var: refused, naming the layer
        return LoadedModel(net, name, "symbol", pre, symbol=Path(args.symbol), params=Path(args.params))
    return _zoo_model(args, stored, quiet)


def _zoo_model(args: argparse.Namespace, stored: Preprocess | None, quiet: bool) -> LoadedModel:
    import mxnet as mx

    from .zoo import BUILTIN_MODELS, get_model, get_trained

    name = args.model
    if name in BUILTIN_MODELS:
        if getattr(args, "params", None) or getattr(args, "classes", None):
            raise UsageError(f"--params/--classes do not apply to the built-in model {name} (its weights are "
                             "trained on MNIST-5k and cached); for your own weights use a gluoncv name or --symbol")
        pre = from_args(args, stored, mnist())
        net = get_trained(name, verbose=not quiet)
        return LoadedModel(net, name, "builtin", pre, classes=10)
    classes = args.classes or 1000
    net = get_model(name, classes=classes)
    pre = from_args(args, stored, imagenet(default_shape(name)))
    mx.random.seed(0)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    try:
        net(mx.nd.zeros(pre.input_shape))
    except mx.base.MXNetError as e:
        raise UsageError(f"--model {name} does not take input shape {pre.input_shape}: "
                         f"{short_message(e)[:200]}", fix="pass --input-shape N,C,H,W") from None
    if args.params:
        try:
            net.load_parameters(str(args.params), ctx=mx.cpu())
        except (AssertionError, mx.base.MXNetError, OSError, ValueError) as e:
            msg = short_message(e)[:200] if str(e).strip() else type(e).__name__
            raise InputError(f"cannot load it into gluoncv {name} with {classes} classes ({msg})", where=args.params,
                             fix="weights of HybridBlock.export go with --symbol; check --classes") from None
        check_net_batchnorm(net, args.params)
    else:
        _note(f"--model {name} without --params has random weights (seed 0; for trying deployq only)")
    net.hybridize()
    return LoadedModel(net, name, "gluoncv", pre, classes=classes,
                       params=Path(args.params) if args.params else None)
