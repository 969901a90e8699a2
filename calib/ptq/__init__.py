"""Post-training passes on a deployq-quantized net: cross-layer equalization (``cle``), empirical bias
correction (``biascorr``) and learned weight rounding on the profile's grid (``adaround``; QDrop's random
dropping of input quantization as an option). ``layers`` holds what they share: each layer's geometry from the
exporters' fp32 graph IR, its fp32 tensors and its simulated (fake-quantized) input."""

from .adaround import AdaRoundConfig, adaround
from .biascorr import bias_correction
from .cle import equalize

__all__ = ["AdaRoundConfig", "adaround", "bias_correction", "equalize"]
