"""Post-training passes on a deployq-quantized net: cross-layer equalization (``cle``), empirical bias
correction (``biascorr``) and learned weight rounding on the profile's grid, per layer (``adaround``; QDrop's
random dropping of input quantization as an option) or per block (``brecq``: block reconstruction with QDrop).
``recon`` is their engine (the net advanced once over the calibration images, activations cached); ``layers``
holds what the passes share: each layer's geometry from the exporters' fp32 graph IR, its fp32 tensors and its
simulated (fake-quantized) input."""

from .adaround import AdaRoundConfig, adaround
from .biascorr import bias_correction
from .brecq import BrecqConfig, brecq
from .cle import equalize

__all__ = ["AdaRoundConfig", "BrecqConfig", "adaround", "bias_correction", "brecq", "equalize"]
