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
