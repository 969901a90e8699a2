"""MXNet's CPU threads: without ``OMP_NUM_THREADS`` MXNet runs its operators on half the cores it sees
(``src/engine/openmp.cc`` assumes hyper-threads), so a 2-core machine computes on one. deployq sets
``OMP_NUM_THREADS`` to the cores this process may use before MXNet is imported, unless the user set it
(then theirs stands); the distributed launcher shares the cores among its workers (``worker_threads``)."""

from __future__ import annotations

import os

#: whether this process set ``OMP_NUM_THREADS`` itself (the user's value is never changed)
SET_HERE = False


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> None:
    """Set ``OMP_NUM_THREADS`` to :func:`usable_cores` where it is unset (only effective before MXNet loads)."""
    global SET_HERE
    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(usable_cores())
        SET_HERE = True


def worker_threads(num_workers: int) -> str:
    """``OMP_NUM_THREADS`` for each of ``num_workers`` processes on this machine: the user's value, or the
    usable cores shared among them (at least 1)."""
    if os.environ.get("OMP_NUM_THREADS") and not SET_HERE:
        return os.environ["OMP_NUM_THREADS"]
    return str(max(1, usable_cores() // max(1, num_workers)))
