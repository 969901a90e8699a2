import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
