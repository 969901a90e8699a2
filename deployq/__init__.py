"""deployq: quantize MXNet Gluon CNNs on an inference engine's exact int8 grid and export them."""

__version__ = "0.1.0"
