"""Shared pieces of the classification problems: a linear (multinomial) logistic model on flat weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

__all__ = ["LinearClassifier"]


class LinearClassifier:
    """Linear model ``logits = X W[:d] + W[d]`` with ``W`` of shape ``(d + 1, C)``; binary problems use ``C = 1``
    and the logistic loss, multiclass ones the softmax cross-entropy.

    Attributes:
        splits: ``{"train": (X, t), "val": (X, t), "test": (X, t)}``.
        n_features, n_classes: ``d`` and the number of classes.
    """

    splits: dict[str, tuple[Tensor, Tensor]]
    n_features: int
    n_classes: int

    @property
    def n_out(self) -> int:
        return 1 if self.n_classes == 2 else self.n_classes

    def logits(self, W: Tensor, X: Tensor) -> Tensor:
        W = W.reshape(self.n_features + 1, self.n_out)
        return X @ W[:-1] + W[-1]

    def losses(self, W: Tensor, X: Tensor, t: Tensor) -> Tensor:
        """Per-sample losses."""
        z = self.logits(W, X)
        if self.n_out == 1:
            return functional.binary_cross_entropy_with_logits(z[:, 0], t.to(z.dtype), reduction="none")
        return functional.cross_entropy(z, t, reduction="none")

    def predict(self, W: Any, X: Tensor) -> Tensor:
        W = torch.as_tensor(W)
        z = self.logits(W.detach(), X)
        return (z[:, 0] > 0).long() if self.n_out == 1 else z.argmax(1)

    def accuracy(self, W: Any, split: str = "test") -> float:
        """Accuracy of the weights ``W`` (inner variable, flat or shaped) on ``"train"``, ``"val"`` or ``"test"``."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)}, got {split!r}")
        X, t = self.splits[split]
        return float((self.predict(W, X) == t).double().mean())

    def test_accuracy(self, W: Any) -> float:
        """Accuracy on the test split."""
        return self.accuracy(W, "test")

    def val_accuracy(self, W: Any) -> float:
        """Accuracy on the validation split."""
        return self.accuracy(W, "val")

    def loss(self, W: Any, split: str = "val") -> float:
        """Mean (unweighted, unregularised) loss on a split."""
        X, t = self.splits[split]
        with torch.no_grad():
            return float(self.losses(torch.as_tensor(W), X, t).mean())

    problem: Any

    def _inner_solution(self, x: Any, max_iter: int | None, on_failure: str) -> Tensor:
        """``W*(x)`` of shape ``(d + 1, C)`` by :func:`bilevel.solve_inner` on the full training set.

        Newton-CG to a tolerance reachable in the dtype; a failed solve warns
        (:class:`bilevel.InnerSolveWarning`) or raises (``on_failure="raise"``), see
        :meth:`bilevel.BilevelProblem.value`.
        """
        p = self.problem
        x = torch.as_tensor(x, dtype=p.dtype, device=p.device).detach().reshape(-1)
        if x.numel() == 1 and p.dx > 1:
            x = x.expand(p.dx)
        opts = {} if max_iter is None else {"max_iter": max_iter}
        _, y, _ = p.value(x, on_failure=on_failure, return_y=True, **opts)
        return y.reshape(self.n_features + 1, self.n_out)
