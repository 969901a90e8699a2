"""deployq: quantize MXNet Gluon CNNs on an inference engine's exact int8 grid and export them."""

__version__ = "0.1.0"

import warnings as _warnings

from .threads import default_threads as _default_threads

_default_threads()  # before MXNet loads: its operators on every usable core (deployq.threads)

# A quantized net's fp32 graph (deployq.float_mode) does not use the quantizers' state, and its quantized graph
# does not use the folded BatchNorms' statistics: Gluon's "not used by any computation" notes are expected.
_warnings.filterwarnings("ignore", message=r"Parameter .* is not used by any computation", category=UserWarning)

from .api import (  # noqa: E402
    Trainer,
    describe,
    export_scales,
    fingerprint,
    float_mode,
    load,
    quant_layers,
    quantize,
    save,
    use_native,
)
from .config import ConfigError, LayerConfig  # noqa: E402
from .profiles import Profile, load_profile  # noqa: E402
from .quantizers import Quantizer, register_quantizer  # noqa: E402

__all__ = ["quantize", "describe", "quant_layers", "float_mode", "export_scales", "fingerprint", "save", "load",
           "Trainer", "use_native", "ConfigError", "LayerConfig", "Profile", "load_profile", "Quantizer",
           "register_quantizer", "__version__"]
