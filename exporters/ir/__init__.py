"""The graph IR shared by every exporter: ``graph`` (Graph, Node), ``ops`` (the MXNet op registry), ``frontend``
(from_gluon, from_files), ``passes``, ``mxnet_lower`` (IR -> MXNet symbol, run), ``annotate`` (scale file -> tensor
thresholds), ``qattach`` (a quantized net's grids -> IR), ``ranges`` (min-max per tensor)."""
