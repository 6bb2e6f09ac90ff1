"""Loading and splitting the real data sets used by the shipped problems (no download at run time)."""

from __future__ import annotations

import glob
import gzip
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_dataset", "as_arrays", "split", "FASHION_MNIST_DIRS", "IJCNN_LIKE"]

#: the ``make_classification`` settings of ``"ijcnn_like"``: ijcnn1's 22 features and ~10 % positives
#: (LIBSVM's ijcnn1, used by benchopt's ``logreg_l2`` bilevel benchmark), small enough for a 2-core CPU
IJCNN_LIKE = dict(
    n_samples=4000,
    n_features=22,
    n_informative=8,
    n_redundant=4,
    n_clusters_per_class=2,
    weights=[0.9],
    flip_y=0.03,
    class_sep=0.8,
    random_state=0,
)

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
    """Features ``(n, d)`` (float64) and integer labels ``(n,)`` of ``"breast_cancer"``, ``"digits"``,
    ``"ijcnn_like"`` (:func:`sklearn.datasets.make_classification` with :data:`IJCNN_LIKE`) or
    ``"fashion-mnist"`` (train and test files concatenated, pixels scaled to ``[0, 1]``).

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: Fashion-MNIST requested but not installed (says how to install it).
    """
    if name in ("breast_cancer", "digits"):
        return _sklearn(name)
    if name in ("ijcnn_like", "ijcnn-like"):
        try:
            from sklearn.datasets import make_classification
        except ImportError as e:  # pragma: no cover
            raise ImportError("the 'ijcnn_like' data set is made by scikit-learn: pip install scikit-learn") from e
        X, y = make_classification(**IJCNN_LIKE)  # type: ignore[arg-type]
        return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if name in ("fashion-mnist", "fashion_mnist"):
        files = _find_fashion((data_dir,) if data_dir else FASHION_MNIST_DIRS)
        X = np.concatenate([_read_idx(files["train-images"]), _read_idx(files["t10k-images"])])
        y = np.concatenate([_read_idx(files["train-labels"]), _read_idx(files["t10k-labels"])])
        return X.reshape(len(X), -1).astype(np.float64) / 255.0, y.astype(np.int64)
    raise ValueError(f"dataset must be 'breast_cancer', 'digits', 'ijcnn_like' or 'fashion-mnist', got {name!r}")


def as_arrays(data: Any, name: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """A user's ``(X, y)`` (numpy arrays, tensors or lists) as float64 features ``(n, d)`` and labels ``0..C-1``.

    Labels may be any values (e.g. ``-1/+1``); they are mapped to ``0..C-1`` in sorted order.

    Raises:
        TypeError: ``data`` is not a pair.
        ValueError: ``X`` not 2-D, ``y`` not 1-D of the same length, fewer than two classes, non-finite features.
    """
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a data set name or a pair (X, y) of arrays, got {type(data).__name__}")
    X = np.asarray(data[0].cpu() if hasattr(data[0], "cpu") else data[0], dtype=np.float64)
    y = np.asarray(data[1].cpu() if hasattr(data[1], "cpu") else data[1])
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"{name} = (X, y) needs X of shape (n, d) and y of shape (n,), got {X.shape} and {y.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: X has non-finite entries")
    classes, t = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{name}: y needs at least two classes, got {classes.tolist()}")
    return X, t.astype(np.int64)


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
