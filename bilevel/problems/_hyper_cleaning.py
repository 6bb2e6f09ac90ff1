r"""Data hyper-cleaning: learn per-example weights that discount corrupted training labels.

Franceschi et al. 2017 (§5.1), Ji et al. 2021, Kwon et al. 2023 (F2SA, §6) and benchopt's
``datacleaning``:

.. math::
    \min_{x \in \mathbb R^{n}} \frac1{n_v}\sum_{j \in \text{val}} \ell(W; a_j, b_j)
    \quad\text{s.t.}\quad W \in \arg\min_W \frac1{n}\sum_{i=1}^{n} \sigma(x_i)\,\ell(W; a_i, \tilde b_i)
    + \rho\|W\|^2,

with :math:`\tilde b_i` the training labels of which a fraction ``corruption`` is replaced by
a wrong class, :math:`\ell` the multinomial logistic loss and :math:`\sigma` the sigmoid.
One hyperparameter per training example.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._problem import BilevelProblem
from ._classification import LinearClassifier
from ._datasets import load_dataset, split

__all__ = ["HyperCleaning", "hyper_cleaning"]


class HyperCleaning(LinearClassifier):
    """A data hyper-cleaning problem (built by :func:`hyper_cleaning`).

    Attributes:
        problem: the :class:`~bilevel.BilevelProblem` (``x``: ``(n_train,)`` weight logits;
            ``y``: weights ``W`` of shape ``(d + 1, C)``).
        corrupted_mask: boolean ``(n_train,)``, True where the training label was corrupted.
        clean_labels: the training labels before corruption.
        splits: train (corrupted labels) / val / test tensors.
        reg: :math:`\\rho`.
    """

    def __init__(
        self,
        dataset: str,
        corruption: float,
        sizes: tuple[Any, Any, Any] | None,
        reg: float,
        n_batches: int | None,
        seed: int,
        dtype: torch.dtype,
        data_dir: str | None,
    ) -> None:
        if not 0 <= corruption < 1:
            raise ValueError(f"corruption must be in [0, 1), got {corruption!r}")
        X, t = load_dataset(dataset, data_dir)
        if sizes is None:
            sizes = (0.5, 0.2, 0.3) if dataset == "digits" else (20000, 5000, 10000)
        tr, va, te = split(X, t, sizes, seed, dtype)
        self.dataset = dataset
        self.n_features = X.shape[1]
        self.n_classes = int(t.max()) + 1
        self.reg = float(reg)
        self.corruption = float(corruption)
        gen = torch.Generator().manual_seed(seed + 1)
        n = len(tr[1])
        self.clean_labels = tr[1].clone()
        mask = torch.rand(n, generator=gen) < corruption
        shift = torch.randint(1, self.n_classes, (n,), generator=gen)
        noisy = torch.where(mask, (tr[1] + shift) % self.n_classes, tr[1])
        self.corrupted_mask = mask
        self.splits = {"train": (tr[0], noisy), "val": va, "test": te}
        self.n_train = n
        idx = torch.arange(n)

        def inner(x: Tensor, W: Tensor, batch: Any) -> Tensor:
            A, b, i = batch
            return (torch.sigmoid(x[i]) * self.losses(W, A, b)).mean() + self.reg * (W**2).sum()

        def outer(x: Tensor, W: Tensor, batch: Any) -> Tensor:
            A, b = batch
            return self.losses(W, A, b).mean()

        if n_batches is None:
            inner_data: Any = (tr[0], noisy, idx)
            outer_data: Any = va
        else:
            parts = [torch.tensor_split(t_, n_batches) for t_ in (tr[0], noisy, idx)]
            inner_data = list(zip(*parts))
            outer_data = list(zip(torch.tensor_split(va[0], n_batches), torch.tensor_split(va[1], n_batches)))
        self.problem = BilevelProblem(
            outer,
            inner,
            torch.zeros(n, dtype=dtype),
            torch.zeros(self.n_features + 1, self.n_out, dtype=dtype),
            outer_data=outer_data,
            inner_data=inner_data,
        )

    def weights(self, x: Tensor) -> Tensor:
        r"""The example weights :math:`\sigma(x)`."""
        return torch.sigmoid(torch.as_tensor(x).detach().reshape(-1))

    def mean_weights(self, x: Tensor) -> tuple[float, float]:
        """Mean weight on corrupted and on clean training examples."""
        w = self.weights(x)
        return float(w[self.corrupted_mask].mean()), float(w[~self.corrupted_mask].mean())

    def solve_inner(self, x: Tensor | None = None, max_iter: int | None = None, on_failure: str = "warn") -> Tensor:
        r"""``W*(x)`` (shape ``(d + 1, C)``) on the full corrupted training set; ``x=None`` trains unweighted.

        Unweighted means every example weight 1 (``x = +50``: :math:`\sigma(x) = 1` to the dtype's precision).
        Delegates to :func:`bilevel.solve_inner` (Newton-CG to a reachable tolerance; formerly L-BFGS without
        a convergence check): a solve that does not converge warns (:class:`bilevel.InnerSolveWarning`) or
        raises with ``on_failure="raise"``.

        Args:
            x: weight logits, shape ``(n_train,)``, or ``None``.
            max_iter: Newton iteration cap (``None``: :func:`bilevel.solve_inner`'s default).
            on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        """
        if x is None:
            x = torch.full((self.n_train,), 50.0, dtype=self.problem.dtype)
        return self._inner_solution(x, max_iter, on_failure)

    def __repr__(self) -> str:
        return (
            f"HyperCleaning(dataset={self.dataset!r}, n_train={self.n_train}, corruption={self.corruption}, "
            f"reg={self.reg})"
        )


def hyper_cleaning(
    dataset: str = "digits",
    corruption: float = 0.5,
    sizes: tuple[Any, Any, Any] | None = None,
    reg: float = 1e-3,
    n_batches: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    data_dir: str | None = None,
) -> HyperCleaning:
    r"""Data hyper-cleaning on corrupted labels.

    Args:
        dataset: ``"digits"`` (scikit-learn, embedded; default split 50 % / 20 % / 30 %) or
            ``"fashion-mnist"`` (Debian package ``dataset-fashion-mnist``; default split 20k / 5k / 10k as
            benchopt's MNIST setting). Raises ``FileNotFoundError`` with the install command when absent.
        corruption: fraction of training labels replaced by a (different) random class.
        sizes: train / val / test sizes (counts or fractions).
        reg: :math:`\rho` of the :math:`\rho\|W\|^2` term.
        n_batches: split train and val into minibatches (stochastic problem).
        seed: split and corruption seed.
        dtype: default float64 for digits, float32 for Fashion-MNIST.
        data_dir: directory with the Fashion-MNIST idx files (overrides the Debian paths).

    Returns:
        A :class:`HyperCleaning` with ``.problem``, ``.corrupted_mask``, ``.accuracy(W, split)``,
        ``.weights(x)``, ``.mean_weights(x)`` and ``.solve_inner(x)``.
    """
    if dtype is None:
        dtype = torch.float64 if dataset == "digits" else torch.float32
    return HyperCleaning(dataset, corruption, sizes, reg, n_batches, seed, dtype, data_dir)
