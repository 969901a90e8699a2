"""Distributed QAT (deployq.dist) on loopback: 2 workers + 1 server on MNIST-5k, states and weights identical on
both workers after every step and equal to single-process runs over the same global batches; the pooled fake-BN
statistics against NumPy; a killed worker stops the run within the timeout and --resume finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from deployq import dist

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS, LR = 32, 3, 0.02
#: the demo's recipe (quantized from step 0, BN folded with frozen statistics) and a variant whose layers compute
#: in fp32 until quant_start_step (ranges tracked from the first batch, not used): its forward does not depend on
#: the part of the batch a worker holds, so it equals a one-context run over the whole global batch
CONFIGS = {
    "qat": [{"op_types": ["Conv2D", "Dense"], "quant_types": ["weight", "input"], "bn_freeze_step": 0}],
    "observe": [{"op_types": ["Conv2D", "Dense"], "quant_types": ["weight", "input"], "quant_start_step": 1000,
                 "bn_freeze_step": 0}],
}


def _data(tmp: Path) -> Path:
    """MNIST-5k images for the runs (the global batches, then the calibration images) in one .npz: the workers
    read it instead of decoding MNIST-5k each."""
    from deployq.data import load_mnist5k

    train = load_mnist5k("train")
    order = np.random.default_rng(3).permutation(len(train))[:GLOBAL_BATCH * STEPS]
    path = tmp / "data.npz"
    np.savez(path, x=train.x[order], y=train.y[order], calib=train.x[:64])
    return path


def _qnet(config: str, ctx: list[mx.Context], data: Path):
    from deployq import quantize
    from deployq.simulate import calibrate_ranges
    from deployq.zoo import get_model, seed_everything

    seed_everything(0)
    net = get_model("mobilenet0.25")
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net(mx.nd.zeros((1, 3, 32, 32), ctx=ctx[0]))
    qnet = quantize(net, CONFIGS[config], "ncnn")
    if config == "qat":
        calibrate_ranges(qnet, np.load(data)["calib"], "minmax")
    qnet.hybridize(static_alloc=True)
    return qnet


def _global_batches(data: Path):
    d = np.load(data)
    for s in range(STEPS):
        yield d["x"][s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH], d["y"][s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH]


def _state(qnet) -> dict[str, np.ndarray]:
    return {k: v.data().asnumpy() for k, v in qnet._collect_params_with_prefix().items()}


def worker_main(config: str, out: str) -> None:
    """A worker of the loopback run: QAT on its part of each global batch, its state dumped after every step."""
    from mxnet import autograd, gluon

    data = Path(out) / "data.npz"
    qnet = _qnet(config, [mx.cpu()], data)
    trainer = dist.DistTrainer(qnet, "sgd", {"learning_rate": LR, "momentum": 0.9}, kvstore="dist_sync",
                               timeout=60)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for s, (xb, yb) in enumerate(_global_batches(data)):
        x, y = dist.worker_part(xb, yb, trainer.rank, trainer.num_workers)
        with autograd.record():
            loss = loss_fn(qnet(mx.nd.array(x)), mx.nd.array(y))
        loss.backward()
        trainer.step(len(x))
        np.savez(Path(out) / f"rank{trainer.rank}_step{s}.npz", **_state(qnet))
    trainer.close()


def _reference(config: str, contexts: int, data: Path) -> list[dict[str, np.ndarray]]:
    """The single-process run over the same global batches: one context, or ``contexts`` contexts each holding
    the part of each batch a worker holds (deployq.Trainer, MXNet's in-process data parallelism). The states
    before training, then after every step."""
    from mxnet import autograd, gluon

    from deployq import Trainer

    ctx = [mx.cpu(i) for i in range(contexts)]
    qnet = _qnet(config, ctx, data)
    states = [_state(qnet)]
    trainer = Trainer(qnet.collect_params(), "sgd", {"learning_rate": LR, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for xb, yb in _global_batches(data):
        parts = [dist.worker_part(xb, yb, r, contexts) for r in range(contexts)]
        with autograd.record():
            losses = [loss_fn(qnet(mx.nd.array(x, ctx=c)), mx.nd.array(y, ctx=c))
                      for (x, y), c in zip(parts, ctx, strict=True)]
        autograd.backward(losses)
        trainer.step(len(xb))
        states.append(_state(qnet))
    return states


def _run_workers(config: str, tmp: Path) -> None:
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                 f"from tests.test_dist_qat import worker_main; worker_main({config!r}, {str(tmp)!r})"]
    cluster = dist.start_nodes(2, 1, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        rc, what = cluster.wait()
    finally:
        cluster.stop()
    logs = b"".join(p.stdout.read() or b"" for p in cluster.workers()).decode(errors="replace")
    assert rc == 0, f"{what}\n{logs[-3000:]}"


def _assert_close(a: dict, b: dict, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


def _dumps(tmp: Path, rank: int) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(tmp / f"rank{rank}_step{s}.npz")) for s in range(STEPS)]


@pytest.mark.slow
@pytest.mark.parametrize("config,contexts", [("qat", 2), pytest.param("observe", 1, marks=pytest.mark.sweep)])
def test_two_workers_match_single_process(tmp_path: Path, config: str, contexts: int) -> None:
    data = _data(tmp_path)
    _run_workers(config, tmp_path)
    w0, w1 = _dumps(tmp_path, 0), _dumps(tmp_path, 1)
    start, *ref = _reference(config, contexts, data)
    ranges = [k for k in w0[0] if k.endswith("input_state")]
    assert ranges and all(w0[-1][k][2] == 1 and w0[-1][k][3] == STEPS for k in ranges)
    for s in range(STEPS):
        for k in w0[s]:  # bitwise identical on both workers: same summed gradients, same reduced states
            np.testing.assert_array_equal(w0[s][k], w1[s][k], err_msg=f"step {s}: {k} differs between workers")
        _assert_close(w0[s], ref[s], f"step {s} vs the single-process run ({contexts} context(s))")
    moved = [k for k in w0[0] if k.endswith("weight") and not np.allclose(w0[-1][k], start[k])]
    assert moved, "training changed no weight"


def test_pooled_fake_bn_statistics_match_global_batch() -> None:
    """reduce_gathered's fake-BN update from per-worker EMA updates == the EMA update with the statistics of the
    whole batch (NumPy), for unequal parts; ranges: min of lo, max of hi, == the global batch's EMA update."""
    rng = np.random.default_rng(0)
    c, m = 5, 0.9
    y = 2.0 * rng.normal(size=(37, c, 3, 3)) + rng.normal(size=(1, c, 1, 1))
    prev_mean, prev_var = rng.normal(size=c), rng.uniform(0.5, 2, size=c)
    parts = [y[:20], y[20:31], y[31:]]

    def ema(z):
        return (m * prev_mean + (1 - m) * z.mean(axis=(0, 2, 3)), m * prev_var + (1 - m) * z.var(axis=(0, 2, 3)))

    prm = mx.gluon.Parameter("x", shape=(c,))
    rprm = mx.gluon.Parameter("r", shape=(4,))
    states = [dist.TrackedState("l:input", "range", (rprm,)), dist.TrackedState("l:fakebn", "bn", (prm, prm), m)]
    lo, hi = -1.5, 2.5
    rows = [np.concatenate([[m * lo + (1 - m) * p.min(), m * hi + (1 - m) * p.max(), 1, 7], *ema(p)]) for p in parts]
    previous = np.concatenate([[lo, hi, 1, 6], prev_mean, prev_var])
    got = dist.reduce_gathered(states, np.stack(rows), np.array([len(p) for p in parts]), previous)
    want = np.concatenate([[m * lo + (1 - m) * y.min(), m * hi + (1 - m) * y.max(), 1, 7], *ema(y)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    same = np.stack([previous, previous])  # no update anywhere (frozen): unchanged, bit for bit
    np.testing.assert_array_equal(dist.reduce_gathered(states, same, np.array([3, 4]), previous)[4:], previous[4:])


def test_shards_cover_the_global_batch() -> None:
    for n, k in ((32, 2), (33, 4), (5, 5)):
        parts = [dist.shard_bounds(n, r, k) for r in range(k)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
        assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def _qat_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deployq.cli", "qat", "--model", "mobilenet0.25", "--data", "builtin",
            "--limit", "256", "--batch-size", "64", "--epochs", "2", "--calib-images", "64", "--lr", "0.01",
            "--out", str(out), "--quiet", "--json", *extra]


@pytest.mark.sweep
def test_killed_worker_stops_the_run_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(_qat_cmd(out, "--launch", "2", "--servers", "1", "--dist-timeout", "30"), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    assert "worker(s) (pids" in line, line
    pids = [int(x) for x in line.split("(pids ")[1].rstrip(")\n").split(", ")]
    meta = Path(f"{out}.ckpt.json")
    t0 = time.monotonic()
    while not meta.exists() and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.1)
    assert meta.exists(), p.communicate()[1]
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - killed < 30
    assert p.returncode == dist.EXIT_PEER_LOST, err
    assert f"worker 1 (pid {pids[1]}) was killed by signal 9" in err, err
    assert not Path(f"{out}.params").exists()  # no final net from a broken run
    assert json.loads(meta.read_text())["epoch"] == 1
    done = subprocess.run(_qat_cmd(out, "--launch", "2", "--resume", "--dist-timeout", "60"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["steps"] == 8 and [h["epoch"] for h in summary["history"]] == [1, 2]
    assert Path(f"{out}.params").exists() and json.loads(meta.read_text())["epoch"] == 2


def test_worker_without_its_peers_stops_within_the_timeout(tmp_path: Path) -> None:
    """A run of 2 workers of which one never comes (or died): the other stops after --dist-timeout, exit 5,
    one line (the watchdog that guards runs under MXNet's own launcher, on several machines)."""
    env = {"PYTHONPATH": str(ROOT)}
    cluster = dist.start_nodes(2, 1, _qat_cmd(tmp_path / "q", "--kvstore", "dist_sync", "--dist-timeout", "4"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lone = cluster.workers()[0]
    try:
        cluster.workers()[1].kill()
        _, err = lone.communicate(timeout=120)
    finally:
        cluster.stop()
    assert lone.returncode == dist.EXIT_PEER_LOST, err
    assert "no progress for 4 s while connecting to the scheduler" in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())
