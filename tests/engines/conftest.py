"""Optional integration tests with the engines' own tools (built by ``bash ../shared/engines/build.sh``, which
prints the ``export`` lines); every test here is skipped, with the reason, when the tools are not found."""

from __future__ import annotations

import pytest
from deployq.exporters.tengine.runtime import TengineTools, find_tools


@pytest.fixture(scope="session")
def tengine_tools() -> TengineTools:
    tools, why = find_tools()
    if tools is None:
        pytest.skip(f"Tengine's tools not built: {why}")
    return tools


@pytest.fixture(scope="session")
def ncnn_bin():
    """The folder ``NCNN_BIN`` names, holding caffe2ncnn and ncnn2int8."""
    import os
    from pathlib import Path

    b = os.environ.get("NCNN_BIN")
    if not b:
        pytest.skip("ncnn's tools not built: NCNN_BIN not set (bash ../shared/engines/build.sh prints it)")
    missing = [t for t in ("caffe2ncnn", "ncnn2int8") if not (Path(b) / t).is_file()]
    if missing:
        pytest.skip(f"ncnn's tools not built: {', '.join(missing)} not in NCNN_BIN={b}")
    return Path(b)
