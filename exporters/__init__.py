"""Exporters over one graph IR: ``ir`` (graph, op registry, front end, passes), then one package per engine.

The flow is one-way: ``ir.frontend`` (Gluon net or json/params -> ``ir.graph.Graph``) -> ``ir.passes`` (fold
BatchNorm, drop Dropout, mark fusable activations) -> ``ir.annotate`` / ``ir.qattach`` (scales from a scale file or a
quantized net) -> an engine's ``lower`` (every engine decision) -> its writer (serialises only). Engine packages:
``ncnn`` (lower, caffe, write, export, runtime, cli), ``tengine`` (lower, writer, reference, simulate, cli), ``onnx``
(export, cli). Engine packages import ``ir``; ``ir`` imports no engine; no module imports a ``cli``.
"""
