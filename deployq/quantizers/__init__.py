"""Quantization algorithms as objects: one :class:`Quantizer` subclass per algorithm, registered by name.

Built in: ``naive``, ``qat``, ``dorefa``, ``lsq``, ``bnn``, ``observer``. Add your own with
:func:`register_quantizer` (docs/quantizers.md).
"""

from .base import Quantizer, reduce_absmax
from .bnn import BNNQuantizer
from .dorefa import DoReFaQuantizer
from .gradient import straight_through, with_gradient
from .lsq import LSQQuantizer
from .naive import NaiveQuantizer
from .observer import ObserverQuantizer
from .qat import QATQuantizer
from .registry import BUILTIN, QUANTIZERS, get_quantizer, register_quantizer

__all__ = ["Quantizer", "QUANTIZERS", "BUILTIN", "register_quantizer", "get_quantizer", "with_gradient",
           "straight_through", "reduce_absmax", "NaiveQuantizer", "QATQuantizer", "DoReFaQuantizer", "LSQQuantizer",
           "BNNQuantizer", "ObserverQuantizer"]
