"""Exporters over one graph IR.

``ir`` (Graph, Node), ``frontend`` (from_gluon, from_files), ``passes`` (fold_batchnorm, drop_dropout,
mark_fusable_activations, optimize), ``mxnet_lower`` (to_symbol, run: the executor), ``annotate``
(scale file -> tensor thresholds). Engine exporters lower the graph to their own records; writers only
serialise.
"""
