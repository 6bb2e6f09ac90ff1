r"""Per-layer weight decay of a small MLP (an ``nn.Module`` inner variable), on scikit-learn's digits.

.. math::
    \min_{x \in \mathbb R^{L}} \frac1{n_v}\sum_{i \in \text{val}} \ell(h_\theta(a_i), b_i)
    \quad\text{s.t.}\quad \theta \in \arg\min_\theta \frac1{n_t}\sum_{i \in \text{train}} \ell(h_\theta(a_i), b_i)
    + \tfrac12 \sum_{l=1}^{L} e^{x_l} \|\theta_l\|^2,

with :math:`h_\theta` an MLP (``nn.Sequential`` of ``nn.Linear`` layers and ``tanh``), :math:`\theta_l` the
weights and bias of layer :math:`l`, :math:`\ell` the softmax cross-entropy: the per-layer weight-decay
setting of Lorraine et al. 2020 (§5) / Pedregosa 2016 on a network small enough for a CPU. The inner
problem is nonconvex; "the" inner solution at ``x`` is the one :func:`bilevel.solve_inner` reaches from
the fixed initialisation ``y0`` (the module's own weights), which :meth:`WeightDecayMLP.retrain` returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from .._problem import BilevelProblem
from ._datasets import load_dataset, split

__all__ = ["WeightDecayMLP", "weight_decay"]


class WeightDecayMLP:
    """Per-layer weight decay of an MLP (built by :func:`weight_decay`).

    Attributes:
        problem: the :class:`~bilevel.BilevelProblem` (``x``: log weight decay per linear layer, shape
            ``(L,)``; ``y``: the ``nn.Module`` — functions receive its ``{name: tensor}`` dict).
        model: the user-side module (its weights are ``y0``; never modified by solvers).
        layers: for each linear layer, the names of its parameters.
        splits: train / val / test tensors.
    """

    def __init__(
        self,
        dataset: str,
        hidden: tuple[int, ...],
        sizes: tuple[float, float, float],
        seed: int,
        dtype: torch.dtype,
        x0: float,
    ) -> None:
        X, t = load_dataset(dataset)
        tr, va, te = split(X, t, sizes, seed, dtype)
        self.splits = {"train": tr, "val": va, "test": te}
        self.dataset = dataset
        d, c = X.shape[1], int(t.max()) + 1
        gen = torch.Generator().manual_seed(seed)
        widths = (d, *hidden, c)
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            lin = nn.Linear(a, b).to(dtype)
            with torch.no_grad():  # deterministic init (LeCun-uniform like nn.Linear's), from our own generator
                bound = 1.0 / a**0.5
                lin.weight.copy_((torch.rand(b, a, generator=gen, dtype=dtype) * 2 - 1) * bound)
                lin.bias.copy_((torch.rand(b, generator=gen, dtype=dtype) * 2 - 1) * bound)
            mods.append(lin)
            if i < len(widths) - 2:
                mods.append(nn.Tanh())
        self.model = nn.Sequential(*mods)
        names = [n for n, _ in self.model.named_parameters()]
        self.layers = [[n for n in names if n.split(".")[0] == str(j)] for j in range(0, len(mods), 2)]
        self.n_layers = len(self.layers)
        model = self.model
        layers = self.layers

        def penalty(x: Tensor, p: dict[str, Tensor]) -> Tensor:
            return 0.5 * sum(torch.exp(x[i]) * sum((p[n] ** 2).sum() for n in ns) for i, ns in enumerate(layers))  # type: ignore[return-value]

        def inner(x: Tensor, p: dict[str, Tensor], batch: Any) -> Tensor:
            A, b = batch
            return functional.cross_entropy(torch.func.functional_call(model, p, (A,)), b) + penalty(x, p)

        def outer(x: Tensor, p: dict[str, Tensor], batch: Any) -> Tensor:
            A, b = batch
            return functional.cross_entropy(torch.func.functional_call(model, p, (A,)), b)

        self.problem = BilevelProblem(
            outer, inner, torch.full((self.n_layers,), float(x0), dtype=dtype), model, outer_data=va, inner_data=tr
        )

    def loss(self, y: Any, split: str = "val") -> float:
        """Mean cross-entropy of the network ``y`` (flat vector or module) on a split."""
        A, b = self.splits[split]
        with torch.no_grad():
            return float(functional.cross_entropy(self._logits(y, A), b))

    def accuracy(self, y: Any, split: str = "test") -> float:
        """Accuracy of the network ``y`` (flat vector or module) on a split."""
        A, b = self.splits[split]
        with torch.no_grad():
            return float((self._logits(y, A).argmax(1) == b).double().mean())

    def _logits(self, y: Any, A: Tensor) -> Tensor:
        p = self.problem.yspec.unflatten(y) if isinstance(y, Tensor) else dict(y.named_parameters())
        return torch.func.functional_call(self.model, p, (A,))

    def retrain(self, x: Any, max_iter: int | None = None, on_failure: str = "warn") -> Tensor:
        """The inner solution at ``x`` from the fixed initialisation (flat), by :func:`bilevel.solve_inner`.

        Args:
            x: log weight decays (flat, shape ``(L,)``).
            max_iter: Newton iteration cap (``None``: the default of :func:`bilevel.solve_inner`).
            on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` (see :meth:`bilevel.BilevelProblem.value`).
        """
        opts = {} if max_iter is None else {"max_iter": max_iter}
        _, y, _ = self.problem.value(x, on_failure=on_failure, return_y=True, **opts)
        return y

    def __repr__(self) -> str:
        return f"WeightDecayMLP(dataset={self.dataset!r}, params={self.problem.dy}, layers={self.n_layers})"


def weight_decay(
    dataset: str = "digits",
    hidden: tuple[int, ...] = (32,),
    sizes: tuple[float, float, float] = (0.5, 0.25, 0.25),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    x0: float = -5.0,
) -> WeightDecayMLP:
    r"""Per-layer weight decay of an MLP on scikit-learn data (the inner variable is an ``nn.Module``).

    Args:
        dataset: ``"digits"`` (64 features, 10 classes; default: 64-32-10, 2,410 parameters),
            ``"breast_cancer"`` or ``"ijcnn_like"``.
        hidden: hidden-layer widths.
        sizes: train / validation / test fractions (features standardised on train).
        seed: split and initialisation seed.
        dtype: dtype of data and network (default float32, as networks are trained).
        x0: initial log weight decay of every layer (:math:`e^{-5} \approx 6.7\times10^{-3}`).

    Returns:
        A :class:`WeightDecayMLP` with ``.problem``, ``.model``, ``.loss(y, split)``,
        ``.accuracy(y, split)`` and ``.retrain(x)``.
    """
    return WeightDecayMLP(dataset, tuple(int(h) for h in hidden), sizes, seed, dtype, x0)
