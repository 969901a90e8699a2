"""Quantization algorithms by name: ``deployq.quantize(net, algorithm=name)`` looks them up here."""

from __future__ import annotations

from .base import Quantizer
from .bnn import BNNQuantizer
from .dorefa import DoReFaQuantizer
from .lsq import LSQQuantizer
from .naive import NaiveQuantizer
from .observer import ObserverQuantizer
from .qat import QATQuantizer

#: the registered algorithms, by name (the built-ins first)
QUANTIZERS: dict[str, type[Quantizer]] = {
    c.name: c for c in (NaiveQuantizer, QATQuantizer, DoReFaQuantizer, LSQQuantizer, BNNQuantizer, ObserverQuantizer)
}
BUILTIN = tuple(QUANTIZERS)


def register_quantizer(name: str, cls: type[Quantizer] | None = None):
    """Register ``cls`` (a :class:`Quantizer` subclass) as algorithm ``name``; returns ``cls``. Without ``cls``,
    a class decorator. Re-registering a user name replaces it; built-in names cannot be replaced."""
    if cls is None:
        return lambda c: register_quantizer(name, c)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"quantizer name {name!r}: must be an identifier-like string")
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise TypeError(f"quantizer {name!r}: {cls!r} is not a subclass of deployq.quantizers.Quantizer")
    if name in BUILTIN and QUANTIZERS[name] is not cls:
        raise ValueError(f"quantizer {name!r} is built in and cannot be replaced; register another name")
    cls.name = name
    QUANTIZERS[name] = cls
    return cls


def get_quantizer(name: str) -> type[Quantizer]:
    """The Quantizer class registered as ``name``."""
    try:
        return QUANTIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown algorithm {name!r}; supported: {', '.join(QUANTIZERS)} "
                         f"(add one with deployq.register_quantizer)") from None
