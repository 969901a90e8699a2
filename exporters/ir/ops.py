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
}
SUPPORTED_OPS: tuple[str, ...] = tuple(OP_ATTRS)
#: MXNet aliases written by some front ends, mapped to the canonical op name.
OP_ALIASES = {"_Plus": "elemwise_add", "_plus": "elemwise_add", "_add": "elemwise_add",
              "Softmax": "SoftmaxOutput", "relu": "Activation"}  # relu: Activation's default act_type


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
