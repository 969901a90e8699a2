"""Progress bars (tqdm) that stay quiet in scripts when asked."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", disable: bool = False, **kw):
    """A tqdm bar on stderr; ``disable=True`` (quiet mode) prints nothing."""
    return tqdm(total=total, desc=desc, disable=disable, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)
