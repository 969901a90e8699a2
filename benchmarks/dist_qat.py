"""Throughput of distributed QAT (deployq.dist, ``dist_sync`` on loopback) against the single-process run, and
the cost of the range synchronisation per step.

mobilenet0.25 (3x32x32, the ``deployq demo`` recipe: weights and inputs on the ncnn grid, fake BN frozen),
hybridized, SGD; a global batch of ``--batch`` random images split over the workers. For 1, 2 and 4 workers (+1
server) it prints images/s (global batch / median step time on rank 0) and its ratio to the single-process
``deployq.Trainer`` run over the same global batch, and the median time of the state all-gather and reduction
(``DistTrainer.state_sync``) measured after a barrier (so that it excludes waiting for slower workers), in ms and
as a share of the step. The single-process run is timed before and after the distributed ones (the faster
counts: a shared machine drifts). Each worker uses ``cpu_count // workers`` OpenMP threads. Usage:
``python benchmarks/dist_qat.py [--workers 1,2,4] [--batch 64] [--steps 20] [--warmup 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import deployq
from deployq import dist
from deployq.demo import QAT_CONFIG
from deployq.zoo import get_model


def make_qnet() -> gluon.HybridBlock:
    mx.random.seed(0)
    net = get_model("mobilenet0.25")
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 32, 32)))
    deployq.quantize(net, QAT_CONFIG, "ncnn", "qat")
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def batch(n: int) -> tuple[mx.nd.NDArray, mx.nd.NDArray]:
    rng = np.random.default_rng(0)
    return (mx.nd.array(rng.standard_normal((n, 3, 32, 32)).astype(np.float32)),
            mx.nd.array(rng.integers(0, 10, n)))


def timed_steps(net, trainer, x, y, n: int, barrier=None) -> list[float]:
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    times = []
    for _ in range(n):
        mx.nd.waitall()
        t = time.perf_counter()
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        if barrier is not None:
            mx.nd.waitall()
            barrier()
        trainer.step(x.shape[0])
        mx.nd.waitall()
        times.append(time.perf_counter() - t)
    return times


def single(args) -> None:
    net = make_qnet()
    trainer = deployq.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    x, y = batch(args.batch)
    timed_steps(net, trainer, x, y, args.warmup)
    step = statistics.median(timed_steps(net, trainer, x, y, args.steps))
    Path(args.result).write_text(json.dumps({"step": step}))


def worker(args) -> None:
    net = make_qnet()
    trainer = dist.DistTrainer(net, "sgd", {"learning_rate": 0.01, "momentum": 0.9}, kvstore="dist_sync",
                               timeout=600)
    a, b = dist.shard_bounds(args.batch, trainer.rank, trainer.num_workers)
    x, y = batch(args.batch)
    x, y = x[a:b], y[a:b]
    timed_steps(net, trainer, x, y, args.warmup)
    step = statistics.median(timed_steps(net, trainer, x, y, args.steps))
    sync = trainer.state_sync
    n0 = len(sync.seconds)
    timed_steps(net, trainer, x, y, args.steps, barrier=trainer._kvstore._barrier)
    cost = statistics.median(sync.seconds[n0:])
    if trainer.rank == 0:
        Path(args.result).write_text(json.dumps({"step": step, "sync": cost, "floats": sync.width}))
    trainer.close()


def _cmd(mode: str, args, result: Path) -> list[str]:
    return [sys.executable, __file__, mode, "--batch", str(args.batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--result", str(result)]


def run_single(args, tmp: Path) -> dict:
    """The single-process run in a fresh process with all cores' OpenMP threads (as each worker set gets)."""
    result = tmp / "single.json"
    subprocess.run(_cmd("--single", args, result), check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    return json.loads(result.read_text())


def run_workers(n: int, args, tmp: Path) -> dict:
    result = tmp / f"w{n}.json"
    cmd = _cmd("--worker", args, result)
    threads = str(max(1, (os.cpu_count() or 1) // n))
    cluster = dist.start_nodes(n, 1, cmd, env={"OMP_NUM_THREADS": threads})
    rc, what = cluster.wait()
    if rc:
        raise SystemExit(f"{n} workers: {what}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4", help="worker counts (comma-separated)")
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker or args.single:
        (worker if args.worker else single)(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        first = run_single(args, Path(tmp))
        runs = {n: run_workers(n, args, Path(tmp)) for n in (int(v) for v in args.workers.split(","))}
        last = run_single(args, Path(tmp))  # before and after: the faster one (a shared machine drifts)
        base = min(first, last, key=lambda r: r["step"])
        rows = [("single process", args.batch / base["step"], 1.0, base["step"], None)]
        for n, r in runs.items():
            rows.append((f"{n} worker(s)", args.batch / r["step"], base["step"] / r["step"], r["step"], r["sync"]))
    print(f"single process step: {1e3 * first['step']:.1f} ms before, {1e3 * last['step']:.1f} ms after the "
          f"distributed runs")
    print(f"mobilenet0.25 QAT (ncnn, demo recipe), global batch {args.batch}, {os.cpu_count()} CPU cores, "
          f"median of {args.steps} steps")
    print(f"{'run':<16}{'images/s':>10}{'vs single':>11}{'step ms':>10}{'sync ms':>10}{'sync share':>12}")
    for name, ips, ratio, step, sync in rows:
        s = "" if sync is None else f"{1e3 * sync:>10.2f}{100 * sync / step:>11.1f}%"
        print(f"{name:<16}{ips:>10.1f}{ratio:>10.2f}x{1e3 * step:>10.1f}{s}")


if __name__ == "__main__":
    main()
