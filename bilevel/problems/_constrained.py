r"""Bilevel problems with coupled lower-level constraints (consumed by :class:`bilevel.LVHBA`).

* :func:`lvhba_toy` — the synthetic problem of Yao et al. 2024 (LV-HBA, §5.1 "toy example",
  from Xiao et al. 2023's E-AiPOD), with a known solution.
* :func:`constrained_svm` — linear SVM hyperparameter selection with per-sample penalties and
  margin constraints in the lower level (Yao et al. 2024, §5.2; Xu & Zhu 2023, GAM) on
  scikit-learn's breast-cancer data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._problem import BilevelProblem
from ._datasets import load_dataset, split

__all__ = ["LVHBAToy", "lvhba_toy", "ConstrainedSVM", "constrained_svm"]


class LVHBAToy:
    r"""LV-HBA's toy problem (built by :func:`lvhba_toy`).

    .. math::
        \min_{x \in \mathbb R^n,\ y = (y_1, y_2) \in \mathbb R^{2n}}
        \tfrac12\|x - y_2\|^2 + \tfrac12\|y_1 - \mathbf 1\|^2
        \quad\text{s.t.}\quad y \in \arg\min_{y'} \Big\{ \tfrac12\|y_1'\|^2 - x^\top y_1' + \mathbf 1^\top y_2'
        \ :\ \mathbf 1^\top x + \mathbf 1^\top y' = 0 \Big\}.

    The coupled equality constraint enters ``constraints(x, y)`` as the two inequalities
    :math:`\pm(\mathbf 1^\top x + \mathbf 1^\top y) \le 0`. Solution (Yao et al. 2024's code):
    :math:`x^* = -0.3\cdot\mathbf 1`, :math:`y_1^* = 0.7\cdot\mathbf 1`, :math:`y_2^* = -0.4\cdot\mathbf 1`
    (lower level: :math:`y_1 = x + \mathbf 1` and :math:`\mathbf 1^\top y_2 = -2\,\mathbf 1^\top x - n`;
    the upper level then gives :math:`10 x_i + 3 = 0`).

    Attributes:
        problem: the :class:`~bilevel.BilevelProblem` (``x``: ``(n,)``, ``y``: ``(2n,)`` = ``[y1, y2]``).
        x_star, y_star: the solution (flat).
        outer_star: the optimal outer value.
    """

    def __init__(self, n: int, start: float, dtype: torch.dtype) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n

        def outer(x: Tensor, y: Tensor, batch: Any) -> Tensor:
            return 0.5 * ((x - y[n:]) ** 2).sum() + 0.5 * ((y[:n] - 1) ** 2).sum()

        def inner(x: Tensor, y: Tensor, batch: Any) -> Tensor:
            return 0.5 * (y[:n] ** 2).sum() - x @ y[:n] + y[n:].sum()

        def constraints(x: Tensor, y: Tensor) -> Tensor:
            s = x.sum() + y.sum()
            return torch.stack([s, -s])

        self.problem = BilevelProblem(
            outer,
            inner,
            torch.full((n,), float(start), dtype=dtype),
            torch.full((2 * n,), float(start), dtype=dtype),
            constraints=constraints,
        )
        self.x_star = torch.full((n,), -0.3, dtype=dtype)
        self.y_star = torch.cat([torch.full((n,), 0.7, dtype=dtype), torch.full((n,), -0.4, dtype=dtype)])
        self.outer_star = float(outer(self.x_star, self.y_star, None))

    def relative_error(self, x: Tensor) -> float:
        r""":math:`\|x - x^*\| / \|x^*\|` (the paper's plotted quantity)."""
        x = torch.as_tensor(x).reshape(-1)
        return float(torch.linalg.vector_norm(x - self.x_star) / torch.linalg.vector_norm(self.x_star))

    def __repr__(self) -> str:
        return f"LVHBAToy(n={self.n})"


def lvhba_toy(n: int = 100, start: float = 0.0, dtype: torch.dtype = torch.float64) -> LVHBAToy:
    """LV-HBA's toy problem with a coupled lower-level constraint and known solution (Yao et al. 2024, §5.1).

    Args:
        n: dimension of ``x`` (``y`` has ``2n`` entries; the paper uses ``n = 100``).
        start: every entry of ``x0`` and ``y0``.
        dtype: dtype of the variables.

    Returns:
        An :class:`LVHBAToy` with ``.problem``, ``.x_star``, ``.y_star``, ``.outer_star``.
    """
    return LVHBAToy(n, start, dtype)


class ConstrainedSVM:
    r"""Linear SVM hyperparameter selection with margin constraints in the lower level.

    Yao et al. 2024 (LV-HBA), §5.2, following Xu & Zhu 2023 (GAM):

    .. math::
        \min_{c \in \mathbb R^{n}} \frac1{n_v}\sum_{j \in \text{val}}
        \mathrm{LeakyReLU}\Big(2\sigma\Big(-5\,\frac{l_j (w^\top a_j + b)}{\|w\|}\Big) - 1\Big)
        \quad\text{s.t.}\quad (w, b, \xi) \in \arg\min \tfrac12\|w\|^2 + \tfrac12\sum_i e^{c_i}\xi_i^2
        \ \text{ s.t. }\ 1 - \xi_i - l_i(w^\top a_i + b) \le 0,

    with labels :math:`l \in \{-1, +1\}`.

    Attributes:
        problem: the :class:`~bilevel.BilevelProblem` (``x``: ``c`` of shape ``(n_train,)``;
            ``y``: ``{"w": (d,), "b": (1,), "xi": (n_train,)}``; ``n_train`` constraints).
        splits: train / val / test ``(A, l)`` tensors.
    """

    def __init__(self, sizes: tuple[Any, Any, Any], seed: int, dtype: torch.dtype) -> None:
        X, t = load_dataset("breast_cancer")
        tr, va, te = split(X, t, sizes, seed, dtype)
        self.splits = {k: (A, (2 * lab - 1).to(dtype)) for k, (A, lab) in zip(("train", "val", "test"), (tr, va, te))}
        A_tr, l_tr = self.splits["train"]
        A_va, l_va = self.splits["val"]
        n, d = A_tr.shape
        self.n_train, self.n_features = n, d
        rng = np.random.default_rng(seed)
        c0 = torch.tensor(rng.uniform(-6.0, -5.0, n), dtype=dtype)
        y0 = {"w": torch.ones(d, dtype=dtype), "b": torch.zeros(1, dtype=dtype), "xi": torch.ones(n, dtype=dtype)}

        def outer(c: Tensor, y: dict[str, Tensor], batch: Any) -> Tensor:
            w, b = y["w"], y["b"]
            m = l_va * (A_va @ w + b) / (torch.linalg.vector_norm(w) + 1e-12)
            return torch.nn.functional.leaky_relu(2 * torch.sigmoid(-5.0 * m) - 1).mean()

        def inner(c: Tensor, y: dict[str, Tensor], batch: Any) -> Tensor:
            return 0.5 * (y["w"] ** 2).sum() + 0.5 * (torch.exp(c) * y["xi"] ** 2).sum()

        def constraints(c: Tensor, y: dict[str, Tensor]) -> Tensor:
            return 1 - y["xi"] - l_tr * (A_tr @ y["w"] + y["b"])

        self.problem = BilevelProblem(outer, inner, c0, y0, constraints=constraints)

    def _wb(self, y: Any) -> tuple[Tensor, Tensor]:
        if isinstance(y, dict):
            return y["w"].detach(), y["b"].detach()
        y = torch.as_tensor(y).detach()
        return y[: self.n_features], y[self.n_features : self.n_features + 1]

    def accuracy(self, y: Any, split: str = "test") -> float:
        """Accuracy of the SVM ``y`` (a ``{"w", "b", "xi"}`` dict or the flat vector) on a split."""
        w, b = self._wb(y)
        A, lab = self.splits[split]
        return float((torch.sign(A @ w + b) == lab).double().mean())

    def test_accuracy(self, y: Any) -> float:
        """Accuracy on the test split."""
        return self.accuracy(y, "test")

    def val_accuracy(self, y: Any) -> float:
        """Accuracy on the validation split."""
        return self.accuracy(y, "val")

    def __repr__(self) -> str:
        return f"ConstrainedSVM(n_train={self.n_train}, n_features={self.n_features})"


def constrained_svm(
    sizes: tuple[Any, Any, Any] = (0.5, 0.25, 0.25), seed: int = 0, dtype: torch.dtype = torch.float64
) -> ConstrainedSVM:
    """Constrained linear-SVM hyperparameter problem on breast cancer (Yao et al. 2024, §5.2).

    Args:
        sizes: train / val / test fractions or counts (features standardised on train).
        seed: split seed (also of the initial ``c ~ U(-6, -5)``, as in the paper's code).
        dtype: dtype of data and variables.

    Returns:
        A :class:`ConstrainedSVM` with ``.problem`` and accuracy helpers.
    """
    return ConstrainedSVM(sizes, seed, dtype)
