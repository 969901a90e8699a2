"""Exporters over one graph IR (see docs/tengine.md).

``ir`` (Graph, Node), ``frontend`` (from_gluon, from_files), ``passes`` (fold_batchnorm, drop_dropout,
mark_fusable_activations, optimize), ``mxnet_lower`` (to_symbol, run: the executor), ``annotate``
(scale file -> tensor thresholds), ``ranges`` (min-max per tensor). Engine exporters lower the graph to
their own records; writers only serialise: ``tengine`` + ``tengine_writer`` (+ ``simulate``, ``tengine_ref``,
``tengine_cli``).
"""
