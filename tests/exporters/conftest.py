"""Shared fixtures: built-in models with random weights (and non-trivial BN statistics) and trained fp32."""

from __future__ import annotations

import mxnet as mx
import numpy as np
import pytest

from deployq.data import load_mnist5k
from deployq.zoo import get_model, get_trained

MODELS = ("mobilenet0.25", "resnet20")


def random_net(name: str, seed: int = 0):
    """An initialised built-in model whose BN layers have random gamma/beta/statistics."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    net = get_model(name)
    net.initialize(mx.init.Xavier(magnitude=2.0))
    net(mx.nd.zeros((1, 3, 32, 32)))
    for p in net.collect_params().values():
        n = p.shape[0]
        if p.name.endswith(("gamma", "running_var")):
            p.set_data(mx.nd.array(rng.uniform(0.5, 1.5, n)))
        elif p.name.endswith(("beta", "running_mean")):
            p.set_data(mx.nd.array(rng.normal(0, 0.2, n)))
    net.hybridize()
    return net


@pytest.fixture(scope="session")
def test_images() -> np.ndarray:
    return load_mnist5k("test").x


@pytest.fixture(scope="session", params=MODELS)
def trained(request):
    return request.param, get_trained(request.param, verbose=False)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
