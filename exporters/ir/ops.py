"""The MXNet ops the IR supports and their typed attributes (MXNet writes every attr as a string)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployq.exporters.ir.graph import GraphError, UnsupportedOpError


def parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise ValueError(f"not a boolean: {s!r}")


def parse_tuple(s: str) -> tuple[int, ...]:
    """``"(3, 3)"`` / ``"[3,3]"`` / ``"3"`` -> ``(3, 3)`` / ``(3,)``."""
    body = s.strip().strip("()[]").strip()
    return tuple(int(v) for v in body.split(",") if v.strip()) if body else ()


def parse_optional_bool(s: str) -> bool | None:
    return None if s.strip() == "None" else parse_bool(s)


def parse_optional_float(s: str) -> float | None:
    return None if s.strip() == "None" else float(s)


def parse_optional_int(s: str) -> int | None:
    return None if s.strip() == "None" else int(s)


def parse_optional_tuple(s: str) -> tuple[int | None, ...]:
    """``"(0, None, 1)"`` -> ``(0, None, 1)`` (slice bounds)."""
    body = s.strip().strip("()[]").strip()
    return tuple(None if v.strip() == "None" else int(v) for v in body.split(",") if v.strip()) if body else ()


def parse_size(s: str) -> tuple[int, ...]:
    """An int or a tuple (``output_size``): ``"1"`` -> ``(1, 1)``, ``"(2, 3)"`` -> ``(2, 3)``."""
    t = parse_tuple(s)
    return t * 2 if len(t) == 1 else t


Parser = Callable[[str], Any]

#: op -> {attr: (parser, default)}; attrs not listed are ignored (e.g. cudnn_tune, workspace, layout=None).
OP_ATTRS: dict[str, dict[str, tuple[Parser, Any]]] = {
    "Convolution": {"kernel": (parse_tuple, ()), "stride": (parse_tuple, ()), "dilate": (parse_tuple, ()),
                    "pad": (parse_tuple, ()), "num_filter": (int, 0), "num_group": (int, 1),
                    "no_bias": (parse_bool, False), "layout": (str, "None")},
    "BatchNorm": {"eps": (float, 1e-3), "momentum": (float, 0.9), "fix_gamma": (parse_bool, True),
                  "use_global_stats": (parse_bool, False), "axis": (int, 1)},
    "Activation": {"act_type": (str, "relu")},
    "clip": {"a_min": (float, 0.0), "a_max": (float, 0.0)},
    "LeakyReLU": {"act_type": (str, "leaky"), "slope": (float, 0.25)},
    "Pooling": {"kernel": (parse_tuple, ()), "stride": (parse_tuple, ()), "pad": (parse_tuple, ()),
                "pool_type": (str, "max"), "global_pool": (parse_bool, False),
                "pooling_convention": (str, "valid"), "count_include_pad": (parse_optional_bool, None),
                "layout": (str, "None")},
    "FullyConnected": {"num_hidden": (int, 0), "no_bias": (parse_bool, False), "flatten": (parse_bool, True)},
    "Flatten": {},
    "elemwise_add": {},
    "broadcast_add": {},
    "broadcast_mul": {},
    "Concat": {"dim": (int, 1), "num_args": (int, 0)},
    "Dropout": {"p": (float, 0.5), "mode": (str, "training")},
    "softmax": {"axis": (int, -1), "temperature": (parse_optional_float, None)},
    "SoftmaxActivation": {"mode": (str, "instance")},
    "SoftmaxOutput": {"multi_output": (parse_bool, False)},
    # shape and layout ops (resolved or lowered per engine)
    "Reshape": {"shape": (parse_tuple, ()), "reverse": (parse_bool, False)},
    "expand_dims": {"axis": (int, 0)},
    "SwapAxis": {"dim1": (int, 0), "dim2": (int, 0)},
    "slice_axis": {"axis": (int, 0), "begin": (int, 0), "end": (parse_optional_int, None)},
    "slice": {"begin": (parse_optional_tuple, ()), "end": (parse_optional_tuple, ()),
              "step": (parse_optional_tuple, ())},
    "Pad": {"mode": (str, "constant"), "pad_width": (parse_tuple, ()), "constant_value": (float, 0.0)},
    "sum": {"axis": (parse_tuple, ()), "keepdims": (parse_bool, False), "exclude": (parse_bool, False)},
    # pooling and resizing
    "_contrib_AdaptiveAvgPooling2D": {"output_size": (parse_size, (1, 1))},
    "_contrib_BilinearResize2D": {"height": (int, 1), "width": (int, 1),
                                  "scale_height": (parse_optional_float, None),
                                  "scale_width": (parse_optional_float, None), "mode": (str, "size"),
                                  "align_corners": (parse_bool, True)},
    "UpSampling": {"scale": (int, 1), "sample_type": (str, "nearest"), "num_args": (int, 1),
                   "multi_input_mode": (str, "concat")},
    # elementwise
    "elemwise_mul": {},
    "ones_like": {},
    "_plus_scalar": {"scalar": (float, 0.0)},
    "_minus_scalar": {"scalar": (float, 0.0)},
    "_rminus_scalar": {"scalar": (float, 0.0)},
    "_mul_scalar": {"scalar": (float, 1.0)},
    "_div_scalar": {"scalar": (float, 1.0)},
    # deployq's own ops, made by the normalising passes (exporters/ir/normalize/); never read from a file
    "ShuffleChannel": {"group": (int, 1)},
    "HardSigmoid": {"alpha": (float, 1 / 6), "beta": (float, 0.5)},
    "HardSwish": {"alpha": (float, 1 / 6), "beta": (float, 0.5)},
}
#: ops the passes create; a model file that names one is refused like any unknown op.
INTERNAL_OPS = ("ShuffleChannel", "HardSigmoid", "HardSwish")
SUPPORTED_OPS: tuple[str, ...] = tuple(op for op in OP_ATTRS if op not in INTERNAL_OPS)
#: MXNet aliases written by some front ends, mapped to the canonical op name.
OP_ALIASES = {"_Plus": "elemwise_add", "_plus": "elemwise_add", "_add": "elemwise_add",
              "Softmax": "SoftmaxOutput", "relu": "Activation", "sigmoid": "Activation",
              "_PlusScalar": "_plus_scalar", "_MinusScalar": "_minus_scalar", "_MulScalar": "_mul_scalar",
              "_DivScalar": "_div_scalar", "_RMinusScalar": "_rminus_scalar", "_Mul": "elemwise_mul",
              "_mul": "elemwise_mul", "swapaxes": "SwapAxis", "reshape": "Reshape", "pad": "Pad",
              "sum_axis": "sum"}  # relu: Activation's default act_type


#: operator forms of activations (``F.relu(x)``): read as ``Activation`` with ``act_type`` = the op name.
OP_FORM_ACTIVATIONS = ("relu", "sigmoid")


def parse_attrs(op: str, raw: dict[str, str], where: str) -> dict[str, Any]:
    """Typed attrs of ``op`` from MXNet's strings, with MXNet's defaults; ``where`` names node and file."""
    out: dict[str, Any] = {}
    for key, (parse, default) in OP_ATTRS[op].items():
        if key in raw:
            try:
                out[key] = parse(raw[key])
            except ValueError as e:
                raise GraphError(f"{where}: op {op}: cannot parse attr {key}={raw[key]!r}: {e}") from None
        else:
            out[key] = default
    if op in ("Convolution", "Pooling"):
        nd = max(len(out["kernel"]), 2)
        for key, fill in (("stride", 1), ("dilate", 1), ("pad", 0)):
            if key in out and not out[key]:
                out[key] = (fill,) * nd
        if out["layout"] not in ("None", "NCHW"):
            raise unsupported_op(where, op, f"layout {out['layout']} (only NCHW)")
    return out


def unsupported_op(where: str, op: str, detail: str = "") -> Exception:
    extra = f" ({detail})" if detail else ""
    return UnsupportedOpError(f"{where}: unsupported op {op}{extra}; "
                              f"supported ops: {', '.join(SUPPORTED_OPS)}")
