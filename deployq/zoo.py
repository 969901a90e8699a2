"""Built-in models (gluoncv, classes=10) and their cached fp32 training on MNIST-5k."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from .data import Split, batches, load_mnist5k
from .progress import progress

#: Built-in model name -> (gluoncv name, fp32 training epochs on MNIST-5k)
BUILTIN_MODELS: dict[str, tuple[str, int]] = {
    "mobilenet0.25": ("mobilenet0.25", 6),
    "resnet20": ("cifar_resnet20_v1", 4),
}
_TRAIN_RECIPE = {"lr": 0.1, "momentum": 0.9, "wd": 1e-4, "batch_size": 64, "seed": 0}


def cache_dir() -> Path:
    """Where fp32 weights are cached: ``$DEPLOYQ_CACHE`` or ``~/.cache/deployq``."""
    d = Path(os.environ.get("DEPLOYQ_CACHE", Path.home() / ".cache" / "deployq"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def get_model(name: str, classes: int = 10) -> gluon.HybridBlock:
    """An uninitialised gluoncv model by built-in or gluoncv name."""
    from gluoncv.model_zoo import get_model as _get

    gname = BUILTIN_MODELS.get(name, (name, 0))[0]
    try:
        net = _get(gname, classes=classes, pretrained=False)
    except ValueError as e:
        raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)} "
                         f"(or any gluoncv classification model name)") from e
    net._deployq_arch = {"kind": "gluoncv", "name": name, "classes": classes}  # how deployq.save rebuilds it
    return net


def seed_everything(seed: int) -> None:
    mx.random.seed(seed)
    np.random.seed(seed)


def evaluate(net: gluon.Block, data: Split, batch_size: int = 250, ctx: mx.Context | None = None) -> float:
    """Top-1 accuracy of ``net`` on ``data`` (inference mode)."""
    return float(np.mean(predict(net, data.x, batch_size, ctx).argmax(1) == data.y))


def predict(net: gluon.Block, x: np.ndarray, batch_size: int = 250, ctx: mx.Context | None = None) -> np.ndarray:
    """Logits of ``net`` for NumPy images ``x`` (inference mode)."""
    ctx = ctx or mx.cpu()
    outs = [net(mx.nd.array(xb, ctx=ctx)).asnumpy() for xb, _ in batches(x, None, batch_size)]
    return np.concatenate(outs)


def train_fp32(net: gluon.HybridBlock, data: Split, epochs: int, seed: int = 0, verbose: bool = True,
               lr: float = 0.1) -> None:
    """Plain SGD training (cosine learning rate), used for the built-in fp32 baselines."""
    seed_everything(seed)
    net.initialize(mx.init.Xavier(magnitude=2.0), force_reinit=True)
    net.hybridize(static_alloc=True)
    steps = epochs * ((len(data) + _TRAIN_RECIPE["batch_size"] - 1) // _TRAIN_RECIPE["batch_size"])
    sched = mx.lr_scheduler.CosineScheduler(max_update=steps, base_lr=lr, final_lr=lr * 0.01)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9,
                                                         "wd": _TRAIN_RECIPE["wd"], "lr_scheduler": sched})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    bar = progress(total=steps, desc="fp32 training", disable=not verbose)
    for epoch in range(epochs):
        for xb, yb in batches(data.x, data.y, _TRAIN_RECIPE["batch_size"], shuffle=True, seed=seed + epoch):
            with autograd.record():
                loss = loss_fn(net(mx.nd.array(xb)), mx.nd.array(yb))
            loss.backward()
            trainer.step(len(xb))
            bar.update(1)
    bar.close()


def get_trained(name: str, verbose: bool = True) -> gluon.HybridBlock:
    """A built-in model trained in fp32 on MNIST-5k, cached after the first call (~40 s on 2 cores)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    gname, epochs = BUILTIN_MODELS[name]
    key = hashlib.sha256(json.dumps([gname, epochs, _TRAIN_RECIPE, mx.__version__, 2]).encode()).hexdigest()[:10]
    path = cache_dir() / f"{name}-mnist5k-{key}.params"
    net = get_model(name)
    if path.exists():
        net.load_parameters(str(path), ctx=mx.cpu())
        net.hybridize(static_alloc=True)
        return net
    t0 = time.time()
    train_fp32(net, load_mnist5k("train"), epochs, verbose=verbose)
    tmp = path.with_suffix(".tmp")
    net.save_parameters(str(tmp))
    os.replace(tmp, path)
    if verbose:
        acc = evaluate(net, load_mnist5k("test"))
        print(f"trained {name} fp32 in {time.time() - t0:.0f}s: test top-1 {acc:.4f} (cached in {path})")
    return net
