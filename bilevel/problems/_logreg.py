r"""L2-regularised logistic regression hyperparameter selection on real data.

.. math::
    \min_{x} \frac1{n_v}\sum_{i \in \text{val}} \ell(W; a_i, b_i) \quad\text{s.t.}\quad
    W \in \arg\min_W \frac1{n_t}\sum_{i \in \text{train}} \ell(W; a_i, b_i)
    + \tfrac12 \sum_{j=1}^{d} e^{x_j} \|W_j\|^2,

with :math:`\ell` the logistic (binary) or softmax cross-entropy (multiclass) loss,
one regularisation strength :math:`e^{x}` (``per_feature=False``) or one per feature
(row :math:`W_j` of the weights; the bias is not regularised). The setting of
Pedregosa 2016 (HOAG), benchopt's ``logreg_l2`` and Lorraine et al. 2020 §5.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._problem import BilevelProblem
from ._classification import LinearClassifier
from ._datasets import as_arrays, load_dataset, split

__all__ = ["LogRegHyperparameter", "logreg"]


class LogRegHyperparameter(LinearClassifier):
    """L2-regularised logistic regression hyperparameter selection (built by :func:`logreg`).

    Attributes:
        problem: the :class:`~bilevel.BilevelProblem` (``x``: log-regularisation, shape ``(1,)`` or ``(d,)``;
            ``y``: weights ``W`` of shape ``(d + 1, C)``, last row the bias).
        splits: train / val / test tensors.
    """

    def __init__(
        self,
        dataset: Any,
        per_feature: bool,
        n_batches: int | None,
        sizes: tuple[float, float, float],
        seed: int,
        dtype: torch.dtype,
        x0: float,
    ) -> None:
        X, t = load_dataset(dataset) if isinstance(dataset, str) else as_arrays(dataset)
        tr, va, te = split(X, t, sizes, seed, dtype)
        self.splits = {"train": tr, "val": va, "test": te}
        self.dataset = dataset if isinstance(dataset, str) else "custom"
        self.n_features = X.shape[1]
        self.n_classes = int(t.max()) + 1
        self.per_feature = per_feature
        d = self.n_features
        x_init = torch.full((d if per_feature else 1,), float(x0), dtype=dtype)
        W0 = torch.zeros(d + 1, self.n_out, dtype=dtype)

        def inner(x: Tensor, W: Tensor, batch: Any) -> Tensor:
            A, b = batch
            return self.losses(W, A, b).mean() + self.penalty(x, W)

        def outer(x: Tensor, W: Tensor, batch: Any) -> Tensor:
            A, b = batch
            return self.losses(W, A, b).mean()

        def batches(data: tuple[Tensor, Tensor]) -> Any:
            if n_batches is None:
                return data
            return [
                (a, b) for a, b in zip(torch.tensor_split(data[0], n_batches), torch.tensor_split(data[1], n_batches))
            ]

        self.problem = BilevelProblem(outer, inner, x_init, W0, outer_data=batches(va), inner_data=batches(tr))

    def penalty(self, x: Tensor, W: Tensor) -> Tensor:
        r""":math:`\tfrac12 \sum_j e^{x_j}\|W_j\|^2` (rows of ``W`` without the bias)."""
        W = W.reshape(self.n_features + 1, self.n_out)
        sq = (W[:-1] ** 2).sum(1)
        return 0.5 * (torch.exp(x) * sq).sum() if self.per_feature else 0.5 * torch.exp(x[0]) * sq.sum()

    def solve_inner(self, x: Tensor, max_iter: int | None = None, on_failure: str = "warn") -> Tensor:
        """The inner solution ``W*(x)`` (shape ``(d + 1, C)``) on the full training set, for references and baselines.

        Delegates to :func:`bilevel.solve_inner` (Newton-CG to a reachable tolerance; it used to be an
        L-BFGS run that silently stopped far from ``W*`` once a penalty reached ~1e12): a solve that does
        not converge warns (:class:`bilevel.InnerSolveWarning`) or raises with ``on_failure="raise"``.

        Args:
            x: log-regularisation (flat, shape ``(1,)`` or ``(d,)``; a scalar is broadcast).
            max_iter: Newton iteration cap (``None``: :func:`bilevel.solve_inner`'s default).
            on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        """
        return self._inner_solution(x, max_iter, on_failure)

    def __repr__(self) -> str:
        return f"LogRegHyperparameter(dataset={self.dataset!r}, per_feature={self.per_feature})"


def logreg(
    dataset: Any = "breast_cancer",
    per_feature: bool = False,
    n_batches: int | None = None,
    sizes: tuple[float, float, float] = (0.5, 0.25, 0.25),
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    x0: float = 0.0,
) -> LogRegHyperparameter:
    r"""L2-regularised logistic regression hyperparameter selection on scikit-learn data.

    Args:
        dataset: ``"breast_cancer"`` (binary, 30 features), ``"digits"`` (10 classes, 64 features),
            ``"ijcnn_like"`` (binary, 22 features, ~10 % positives: :func:`sklearn.datasets.make_classification`
            shaped like LIBSVM's ijcnn1, 4000 samples), or your own data as a pair ``(X, y)`` of arrays or
            tensors (features ``(n, d)``, labels ``(n,)`` of any values, mapped to ``0..C-1``).
        per_feature: one regularisation strength per feature instead of one in total.
        n_batches: split train and validation data into that many minibatches (stochastic problem);
            ``None``: one full batch each.
        sizes: train / validation / test fractions (features standardised on train).
        seed: shuffling seed.
        dtype: dtype of data and variables.
        x0: initial log-regularisation.

    Returns:
        A :class:`LogRegHyperparameter` with ``.problem``, ``.accuracy(W, split)``, ``.solve_inner(x)``.
    """
    return LogRegHyperparameter(dataset, per_feature, n_batches, sizes, seed, dtype, x0)
