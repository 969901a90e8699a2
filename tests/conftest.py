import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")

import pytest  # noqa: E402

SWEEP = os.environ.get("DEPLOYQ_SWEEP") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``sweep`` (minutes each: multi-process kill/resume runs, full sweeps) run only with
    ``DEPLOYQ_SWEEP=1``, so that the default suite stays within its time budget."""
    if SWEEP:
        return
    skip = pytest.mark.skip(reason="long sweep: set DEPLOYQ_SWEEP=1 to run it")
    for item in items:
        if "sweep" in item.keywords:
            item.add_marker(skip)
