"""deployq.threads: MXNet's operators on every usable core unless the user chose (MXNet alone takes half)."""

import os
import subprocess
import sys

from deployq import threads


def test_unset_gets_the_usable_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "SET_HERE", False)
    threads.default_threads()
    assert os.environ["OMP_NUM_THREADS"] == str(threads.usable_cores()) and threads.SET_HERE
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.worker_threads(2) == "4" and threads.worker_threads(3) == "2" and threads.worker_threads(16) == "1"


def test_the_users_value_stands(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(threads, "SET_HERE", False)
    threads.default_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3" and not threads.SET_HERE
    assert threads.worker_threads(2) == "3"


def test_import_sets_it_before_mxnet_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = ("import deployq, os, mxnet; "
            "print(os.environ['OMP_NUM_THREADS'], deployq.threads.usable_cores(), deployq.threads.SET_HERE)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    got, cores, here = out.split()
    assert got == cores and here == "True"
