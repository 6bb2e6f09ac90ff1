"""Loading and splitting the real data sets used by the shipped problems (no download at run time)."""

from __future__ import annotations

import glob
import gzip
import os

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_dataset", "split", "FASHION_MNIST_DIRS"]

#: where Debian's ``dataset-fashion-mnist`` package may put its files (searched in order)
FASHION_MNIST_DIRS = (
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/fashion-mnist",
    "/usr/share/datasets/fashion-mnist",
    "/usr/lib/dataset-fashion-mnist",
)


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets
    except ImportError as e:  # pragma: no cover
        raise ImportError(f"the {name!r} data set ships with scikit-learn: pip install scikit-learn") from e
    loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]
    d = loader()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_fashion(dirs: tuple[str, ...]) -> dict[str, str]:
    files: dict[str, str] = {}
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "**", "*-ubyte*"), recursive=True)):
            base = os.path.basename(path)
            for key in ("train-images", "train-labels", "t10k-images", "t10k-labels"):
                if base.startswith(key) and key not in files:
                    files[key] = path
        if len(files) == 4:
            return files
    raise FileNotFoundError(
        "Fashion-MNIST not found (searched " + ", ".join(dirs) + "). Debian and Ubuntu ship it: "
        "`sudo apt-get install dataset-fashion-mnist`; or pass data_dir= pointing at the directory holding "
        "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), "
        "t10k-labels-idx1-ubyte(.gz)"
    )


def load_dataset(name: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, d)`` (float64) and integer labels ``(n,)`` of ``"breast_cancer"``, ``"digits"`` or
    ``"fashion-mnist"`` (train and test files concatenated, pixels scaled to ``[0, 1]``).

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: Fashion-MNIST requested but not installed (says how to install it).
    """
    if name in ("breast_cancer", "digits"):
        return _sklearn(name)
    if name in ("fashion-mnist", "fashion_mnist"):
        files = _find_fashion((data_dir,) if data_dir else FASHION_MNIST_DIRS)
        X = np.concatenate([_read_idx(files["train-images"]), _read_idx(files["t10k-images"])])
        y = np.concatenate([_read_idx(files["train-labels"]), _read_idx(files["t10k-labels"])])
        return X.reshape(len(X), -1).astype(np.float64) / 255.0, y.astype(np.int64)
    raise ValueError(f"dataset must be 'breast_cancer', 'digits' or 'fashion-mnist', got {name!r}")


def split(
    X: np.ndarray,
    y: np.ndarray,
    sizes: tuple[int | float, int | float, int | float],
    seed: int,
    dtype: torch.dtype,
    standardize: bool = True,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Shuffle and split into train / validation / test (sizes as counts or fractions), standardising
    features with the training statistics."""
    n = len(X)
    if all(isinstance(s, float) for s in sizes):
        # fractions: round the cumulative sums, so fractions summing to 1 use every sample and never overshoot
        if sum(sizes) > 1 + 1e-9:
            raise ValueError(f"split fractions {tuple(sizes)} sum to more than 1")
        cum = [min(n, int(round(c * n))) for c in np.cumsum(sizes)]
        counts = [b - a for a, b in zip([0, *cum[:-1]], cum)]
    else:
        counts = [int(round(s * n)) if isinstance(s, float) else int(s) for s in sizes]
    if sum(counts) > n:
        raise ValueError(f"split sizes {counts} exceed the {n} samples")
    perm = np.random.default_rng(seed).permutation(n)
    idx = np.split(perm[: sum(counts)], np.cumsum(counts)[:-1])
    if standardize:
        mu = X[idx[0]].mean(0)
        sd = X[idx[0]].std(0)
        sd[sd == 0] = 1.0
        X = (X - mu) / sd
    return tuple((torch.tensor(X[i], dtype=dtype), torch.tensor(y[i])) for i in idx)  # type: ignore[return-value]
