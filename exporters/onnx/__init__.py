"""ONNX QDQ: ``export`` (IR -> onnx model with the onnx helpers), ``cli`` (``deployq export-onnx``)."""
