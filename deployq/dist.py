"""Distributed QAT on MXNet's kvstore: kvstores, worker rank and data shards, the quantization states kept
identical on every worker, a watchdog for lost workers, and a loopback launcher (docs/distributed.md).

What a distributed step computes. The global batch (``--batch-size``) is split into one nearly equal part per
worker (:func:`worker_part`); gradients are summed through the kvstore (``update_on_kvstore=False``: every worker
applies the same optimizer to the same summed gradient, divided by the global batch size). After each step
:class:`DistTrainer` gathers every tracked quantization state of every worker through the kvstore (an all-gather:
each worker pushes its states into its own slot of a zero vector, the servers sum, everyone pulls the whole) and
reduces them with :func:`reduce_gathered`, the same arithmetic on every worker, so all hold identical states:

- tracked ranges ``[lo, hi, initialised, steps]`` (layer inputs, layer and block outputs): the minimum of the
  ``lo`` and the maximum of the ``hi``; for the moving average ``m * lo + (1 - m) * batch_lo`` (and the
  observer's running min/max) that is exactly the update with the global batch's minimum and maximum;
- fake-BN running statistics: the mean averaged, weighted by the workers' batch sizes, and the variance averaged
  plus ``(1 - m)`` times the spread of the workers' batch means, which is exactly the update with the global
  batch's statistics (the pooled variance);
- step counters (``quant_start_step``, ``bn_freeze_step``): the maximum (all equal).

A training forward quantizes with the range (and folds with the running statistics) updated by its own batch, so
a worker's forward sees its part of the batch, as each context does in MXNet's single-process data parallelism
(:class:`deployq.Trainer` over several contexts): the distributed run equals that single-process run over the
same global batches; it equals a one-context run over the whole global batch where a layer's forward does not
depend on its range (before ``quant_start_step``, an observer).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mxnet as mx
import numpy as np
from mxnet import gluon

from .api import Trainer, output_quantizers, quant_layers
from .errors import UsageError
from .threads import worker_threads

KVSTORES = ("local", "device", "dist_sync", "dist_device_sync")
#: exit code of a worker that lost its peers (a worker, server or the scheduler died or hangs) and of the
#: launcher when a process of its run failed
EXIT_PEER_LOST = 5
#: first kvstore key of the state all-gather (gluon's Trainer uses 0 .. number of parameters - 1)
STATE_KEY = 1 << 28
DEFAULT_TIMEOUT = 300.0


# ---------------------------------------------------------------------- kvstore, rank, shards

def is_distributed(kind: str) -> bool:
    return kind.startswith("dist")


def create_kvstore(kind: str, timeout: float = DEFAULT_TIMEOUT) -> mx.kv.KVStore:
    """An MXNet kvstore of ``kind`` (:data:`KVSTORES`). A ``dist_*`` one connects to the scheduler named by the
    ``DMLC_*`` environment of a launcher (``deployq qat --launch N``, MXNet's ``tools/launch.py``); waiting for
    the other nodes longer than ``timeout`` seconds ends the process (:class:`Watchdog`)."""
    if kind not in KVSTORES:
        raise UsageError(f"--kvstore {kind!r} is not supported; use one of {', '.join(KVSTORES)}")
    if not is_distributed(kind):
        return mx.kv.create(kind)
    missing = [v for v in ("DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_WORKER")
               if not os.environ.get(v)]
    if missing:
        raise UsageError(f"--kvstore {kind} needs the environment a launcher sets ({', '.join(missing)} unset)",
                         fix="run it with deployq qat --launch N, or with MXNet's tools/launch.py "
                             "(docs/distributed.md)")
    where = f"{os.environ['DMLC_PS_ROOT_URI']}:{os.environ['DMLC_PS_ROOT_PORT']}"
    with Watchdog(timeout, f"connecting to the scheduler at {where}"):
        return mx.kv.create(kind)


def rank_and_workers(kv: mx.kv.KVStore | None) -> tuple[int, int]:
    """(this worker's rank, number of workers); (0, 1) without a kvstore."""
    return (0, 1) if kv is None else (int(kv.rank), int(kv.num_workers))


def shard_bounds(n: int, rank: int, num_workers: int) -> tuple[int, int]:
    """[start, stop) of worker ``rank``'s part of ``n`` items: nearly equal parts, the first ``n % num_workers``
    one item longer (NumPy's ``array_split``)."""
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank {rank} is not in 0..{num_workers - 1}")
    base, extra = divmod(n, num_workers)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def worker_part(x: np.ndarray, y: np.ndarray | None, rank: int, num_workers: int):
    """Worker ``rank``'s part of one global batch ``(x, y)`` (see :func:`shard_bounds`)."""
    a, b = shard_bounds(len(x), rank, num_workers)
    return x[a:b], (None if y is None else y[a:b])


def worker_batches(x: np.ndarray, y: np.ndarray | None, global_batch: int, rank: int, num_workers: int,
                   shuffle: bool = False, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """This worker's part of every global batch of ``deployq.data.batches`` (same order on every worker: same
    ``seed``); a last global batch with fewer images than workers is dropped (on every worker alike)."""
    from .data import batches

    for xb, yb in batches(x, y, global_batch, shuffle=shuffle, seed=seed):
        if len(xb) >= num_workers:
            yield worker_part(xb, yb, rank, num_workers)


# ---------------------------------------------------------------------- tracked states

@dataclass(frozen=True)
class TrackedState:
    """One tracked quantization state of a layer: ``kind`` ``"range"`` (a ``[lo, hi, initialised, steps]``
    parameter) or ``"bn"`` (fake-BN running ``mean`` and ``var`` with the BatchNorm's ``momentum``)."""

    name: str
    kind: str
    params: tuple[gluon.Parameter, ...]
    momentum: float = 0.0

    @property
    def size(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.params)


def tracked_states(net: gluon.Block) -> list[TrackedState]:
    """Every quantization state of a deployq-quantized ``net`` that training updates outside the optimizer: the
    input and output ranges of its quantized layers, its block-output ranges and its fake-BN running statistics
    (not those of a layer frozen from the start, ``bn_freeze_step: 0``). LSQ steps are parameters (gradients)."""
    out: list[TrackedState] = []
    for path, b in quant_layers(net).items():
        out.append(TrackedState(f"{path}:input", "range", (b.input_state,)))
        if b.layer_config.output is not None:
            out.append(TrackedState(f"{path}:output", "range", (b.output_state,)))
        if b._dq_bn_kwargs is not None and b.layer_config.bn_freeze_step != 0:
            out.append(TrackedState(f"{path}:fakebn", "bn", (b.fakebn_mean, b.fakebn_var),
                                    float(b._dq_bn_kwargs.get("momentum", 0.9))))
    for path, q in output_quantizers(net).items():
        out.append(TrackedState(f"{path}:output", "range", (q.output_state,)))
    return out


def _read(states: Sequence[TrackedState], ctx_index: int) -> np.ndarray:
    return np.concatenate([p.list_data()[ctx_index].asnumpy().astype(np.float64).reshape(-1)
                           for s in states for p in s.params]) if states else np.zeros(0)


def _write(states: Sequence[TrackedState], flat: np.ndarray, unchanged: np.ndarray | None = None) -> None:
    """Write ``flat`` into every context of the states' parameters; parameters whose values equal
    ``unchanged`` (what every context holds already) are skipped."""
    o = 0
    for s in states:
        for p in s.params:
            n = int(np.prod(p.shape))
            value = flat[o:o + n]
            if unchanged is None or not np.array_equal(value, unchanged[o:o + n]):
                for arr in p.list_data():
                    arr[:] = value.reshape(p.shape).astype(arr.dtype)  # a synchronous copy from host memory
            o += n


def reduce_gathered(states: Sequence[TrackedState], gathered: np.ndarray, counts: np.ndarray,
                    previous: np.ndarray) -> np.ndarray:
    """The reduced states (flat, float64) from every worker's (and context's) states after one step.

    ``gathered`` (R, L): one row per worker/context; ``counts`` (R,): their batch sizes; ``previous`` (L,): the
    reduced states before the step (the fake-BN update is undone with them to recover each batch's mean).
    Semantics in the module docstring."""
    g = np.asarray(gathered, np.float64)
    w = np.asarray(counts, np.float64) / float(np.sum(counts))
    out = g[0].copy()
    o = 0
    for s in states:
        n = s.size
        blk = g[:, o:o + n]
        if s.kind == "range":
            init = blk[:, 2] > 0.5
            if init.any():
                out[o] = blk[init, 0].min()
                out[o + 1] = blk[init, 1].max()
            out[o + 2], out[o + 3] = blk[:, 2].max(), blk[:, 3].max()
        elif not (blk == blk[0]).all():  # "bn": unchanged everywhere (frozen, inference) stays as it is
            c, m = n // 2, s.momentum
            mean, var = blk[:, :c], blk[:, c:]
            batch_mean = (mean - m * previous[o:o + c]) / (1.0 - m)
            pooled = w @ batch_mean
            out[o:o + c] = w @ mean
            out[o + c:o + n] = w @ var + (1.0 - m) * (w @ np.square(batch_mean - pooled))
        o += n
    return out


class StateSync:
    """Keeps the tracked states of ``states`` identical on every worker and context: :meth:`reduce` after each
    step (an all-gather through ``kv`` on key :data:`STATE_KEY`, then :func:`reduce_gathered`)."""

    def __init__(self, states: Sequence[TrackedState], kv: mx.kv.KVStore | None, contexts: int = 1,
                 key: int = STATE_KEY) -> None:
        self.states = list(states)
        self.kv, self.key, self.contexts = kv, key, contexts
        self.rank, self.num_workers = rank_and_workers(kv) if kv is not None and "dist" in kv.type else (0, 1)
        self.width = sum(s.size for s in self.states) + 1  # + the batch size
        self.previous = _read(self.states, 0)
        self.seconds: list[float] = []  # time of each reduce (benchmarks)
        if self.num_workers > 1:
            kv.init(self.key, mx.nd.zeros((self.num_workers * contexts * self.width,), dtype="float64"))

    def snapshot(self) -> None:
        """Record the current states as the reduced ones (after changing fake-BN statistics between steps)."""
        self.previous = _read(self.states, 0)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        if self.num_workers == 1:
            return rows
        buf = np.zeros((self.num_workers * self.contexts, self.width))
        buf[self.rank * self.contexts:(self.rank + 1) * self.contexts] = rows
        nd = mx.nd.array(buf.reshape(-1), dtype="float64")
        self.kv.push(self.key, nd)
        out = mx.nd.zeros(nd.shape, dtype="float64")
        self.kv.pull(self.key, out=out)
        return out.asnumpy().reshape(buf.shape)

    def reduce(self, batch_size: int) -> int:
        """Reduce the states of every worker after a step on ``batch_size`` local images; returns the global
        batch size (the sum over workers)."""
        t0 = time.perf_counter()
        rows = np.stack([np.append(_read(self.states, c), batch_size / self.contexts)
                         for c in range(self.contexts)])
        g = self._gather(rows)
        counts = g[:, -1]
        if self.states and len(g) > 1:
            merged = reduce_gathered(self.states, g[:, :-1], counts, self.previous)
            _write(self.states, merged, rows[0, :-1] if self.contexts == 1 else None)
            self.previous = merged
        elif self.states:
            self.previous = rows[0, :-1]
        self.seconds.append(time.perf_counter() - t0)
        return int(round(counts.sum()))


# ---------------------------------------------------------------------- trainer

class DistTrainer(Trainer):
    """A :class:`deployq.Trainer` whose gradients go through ``kvstore`` (a name of :data:`KVSTORES` or an
    ``mx.kv.KVStore``) and whose tracked quantization states are reduced across workers at every step (module
    docstring). ``net``: the deployq-quantized net (its parameters are trained). ``step(batch_size)`` takes this
    worker's batch size; the gradient is divided by the global one. Rank 0's weights and states are broadcast
    at construction. ``timeout``: seconds a worker waits for the others before it stops (:class:`Watchdog`)."""

    def __init__(self, net: gluon.Block, optimizer: str | mx.optimizer.Optimizer,
                 optimizer_params: dict | None = None, kvstore: str | mx.kv.KVStore = "device",
                 timeout: float = DEFAULT_TIMEOUT, **kwargs) -> None:
        kv = create_kvstore(kvstore, timeout) if isinstance(kvstore, str) else kvstore
        super().__init__(net.collect_params(), optimizer, optimizer_params, kvstore=kv, update_on_kvstore=False,
                         **kwargs)
        self.rank, self.num_workers = rank_and_workers(kv) if "dist" in kv.type else (0, 1)
        self.watchdog = (Watchdog(timeout, "waiting for the other workers", f"worker {self.rank}")
                         if self.num_workers > 1 else None)
        if self.watchdog is not None:
            self.watchdog.start()
        self._init_kvstore()
        self._init_params()  # kvstore init + pull: every worker starts from rank 0's parameters and states
        self.state_sync = StateSync(tracked_states(net), kv, len(self._contexts))
        if self.watchdog is not None:
            self.watchdog.beat()

    def step(self, batch_size: int, ignore_stale_grad: bool = False) -> None:
        total = self.state_sync.reduce(batch_size)
        Trainer.sync(self)  # contexts of this worker (identical now) and LSQ input steps from the ranges
        gluon.Trainer.step(self, total, ignore_stale_grad)
        if self.watchdog is not None:
            self.watchdog.beat()

    def close(self) -> None:
        """Stop the watchdog (the run is over)."""
        if self.watchdog is not None:
            self.watchdog.stop()


# ---------------------------------------------------------------------- watchdog

class Watchdog:
    """Ends the process (exit :data:`EXIT_PEER_LOST`, one line on stderr) when ``timeout`` seconds pass without
    :meth:`beat`: a distributed step waits for every worker, so a dead or stuck peer would otherwise hang the
    others forever. A context manager for one guarded wait."""

    def __init__(self, timeout: float, doing: str, who: str = "a worker") -> None:
        self.timeout, self.doing, self.who = float(timeout), doing, who
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="deployq-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self._last > self.timeout:
                sys.stderr.write(f"deployq: error: {self.who}: no progress for {self.timeout:g} s while "
                                 f"{self.doing} (a worker, server or the scheduler died or hangs); stopping "
                                 f"(exit {EXIT_PEER_LOST}; --resume continues from the last checkpoint)\n")
                sys.stderr.flush()
                os._exit(EXIT_PEER_LOST)


# ---------------------------------------------------------------------- launcher (loopback)

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (bound to port 0 and released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """The processes of one loopback run: ``(role, index, Popen)``, the scheduler first."""

    port: int
    procs: list[tuple[str, int, subprocess.Popen]] = field(default_factory=list)

    def workers(self) -> list[subprocess.Popen]:
        return [p for role, _, p in self.procs if role == "worker"]

    def stop(self, grace: float = 5.0) -> None:
        """Terminate every process still running (SIGKILL after ``grace`` seconds)."""
        live = [p for _, _, p in self.procs if p.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait(self, poll: float = 0.2) -> tuple[int, str]:
        """Wait until every worker ended; (0, "") when all succeeded, else (:data:`EXIT_PEER_LOST`, what failed)
        as soon as any process fails (or a server/the scheduler ends early), after stopping the others."""
        ended: dict[int, float] = {}  # a server or the scheduler ends cleanly as the last workers finalise
        while True:
            if all(p.poll() == 0 for p in self.workers()):
                self.stop()
                return 0, ""
            for role, i, p in self.procs:
                rc = p.poll()
                if rc is None or (rc == 0 and role == "worker"):
                    continue
                if rc == 0 and time.monotonic() - ended.setdefault(p.pid, time.monotonic()) < 10.0:
                    continue
                self.stop()
                how = (f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}" if rc
                       else "ended before the workers")
                return EXIT_PEER_LOST, f"{role} {i} (pid {p.pid}) {how}; stopped the other processes of the run"
            time.sleep(poll)


def start_nodes(num_workers: int, num_servers: int, worker_cmd: Sequence[str], env: dict | None = None,
                host: str = "127.0.0.1", **popen) -> Cluster:
    """Start a scheduler, ``num_servers`` servers and ``num_workers`` workers (``worker_cmd``) on ``host`` with
    MXNet's ``DMLC_*`` environment (the scheduler on a free port); servers are ``python -c "import mxnet"``
    (MXNet runs a server or scheduler at import when ``DMLC_ROLE`` says so). ``popen``: for the workers."""
    if num_workers < 1 or num_servers < 1:
        raise UsageError(f"a distributed run needs at least one worker and one server (got {num_workers} "
                         f"workers, {num_servers} servers)")
    port = free_port(host)
    base = {**os.environ, **(env or {}), "DMLC_PS_ROOT_URI": host, "DMLC_PS_ROOT_PORT": str(port),
            "DMLC_NUM_WORKER": str(num_workers), "DMLC_NUM_SERVER": str(num_servers), "DMLC_NODE_HOST": host}
    cluster = Cluster(port)
    node = [sys.executable, "-c", "import mxnet"]
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    popen = {"stdin": subprocess.DEVNULL, **popen}
    try:
        cluster.procs.append(("scheduler", 0, subprocess.Popen(node, env={**base, "DMLC_ROLE": "scheduler"},
                                                               **quiet)))
        for i in range(num_servers):
            cluster.procs.append(("server", i, subprocess.Popen(
                node, env={**base, "DMLC_ROLE": "server", "OMP_NUM_THREADS": "1"}, **quiet)))
        wenv = {**base, "DMLC_ROLE": "worker", "OMP_NUM_THREADS": (env or {}).get("OMP_NUM_THREADS")
                                                       or worker_threads(num_workers)}
        for i in range(num_workers):
            cluster.procs.append(("worker", i, subprocess.Popen(list(worker_cmd), env=wenv, **popen)))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def launch(num_workers: int, num_servers: int, worker_cmd: Sequence[str], quiet: bool = False) -> int:
    """Run ``worker_cmd`` as ``num_workers`` workers with ``num_servers`` servers on loopback until the workers
    end; a failed process stops the run (exit :data:`EXIT_PEER_LOST`, one line naming it). Ctrl-C stops it."""
    cluster = start_nodes(num_workers, num_servers, worker_cmd)
    if not quiet:
        pids = ", ".join(str(p.pid) for p in cluster.workers())
        print(f"deployq: scheduler on 127.0.0.1:{cluster.port}, {num_servers} server(s), {num_workers} worker(s) "
              f"(pids {pids})", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        rc, what = cluster.wait()
    except KeyboardInterrupt:
        cluster.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if rc:
        print(f"deployq: error: {what} (--resume continues from the last checkpoint)", file=sys.stderr,
              flush=True)
    return rc
