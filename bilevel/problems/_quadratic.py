r"""A quadratic bilevel problem with closed-form solution and hypergradient (benchopt's design).

Inner (strongly convex in ``y``, condition number ``cond``):

.. math::
    g(x, y) = \tfrac12 y^\top A y - y^\top (B x + b), \qquad y^*(x) = A^{-1}(B x + b).

Outer:

.. math::
    f(x, y) = \tfrac12 \|y - y_t\|^2 + \tfrac{\rho}2 \|x\|^2, \qquad
    F(x) = f(x, y^*(x)), \quad \nabla F(x) = J^\top (y^*(x) - y_t) + \rho x, \quad J = A^{-1} B,

so :math:`F` is a strongly convex quadratic with minimiser
:math:`x^* = -(J^\top J + \rho I)^{-1} J^\top (A^{-1} b - y_t)`.

The stochastic version splits the data into ``n_batches`` minibatches
:math:`(A_k, B_k, b_k)` (inner) and :math:`y_{t,k}` (outer) whose means are
:math:`A, B, b, y_t`; each :math:`A_k` stays positive definite. The full-data
outer value then adds the constant :math:`\tfrac12\,\mathrm{mean}_k\|y_{t,k} - y_t\|^2`
(included in :attr:`QuadraticBilevel.outer_star` and :meth:`QuadraticBilevel.outer_value`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._problem import BilevelProblem

__all__ = ["QuadraticBilevel", "quadratic"]


class QuadraticBilevel:
    """A quadratic bilevel problem and its closed forms (built by :func:`quadratic`).

    Attributes:
        problem: the :class:`~bilevel.BilevelProblem` (``x`` and ``y`` plain 1-D tensors).
        A, B, b, y_target, reg: the data of the problem (means over batches when stochastic).
        x_star: the minimiser of :math:`F(x) = f(x, y^*(x))`.
        outer_star: :math:`F(x^*)` (full data).
        L_inner, mu_inner: largest and smallest eigenvalue of :math:`A` (``L_inner / mu_inner = cond``).
        L_outer, mu_outer: largest and smallest eigenvalue of :math:`\\nabla^2 F`.
    """

    def __init__(
        self,
        dx: int,
        dy: int,
        cond: float,
        reg: float,
        seed: int,
        dtype: torch.dtype,
        n_batches: int | None,
        noise: float,
        coupling: float,
    ) -> None:
        if dx < 1 or dy < 1:
            raise ValueError(f"dx and dy must be >= 1, got dx={dx}, dy={dy}")
        if not cond >= 1:
            raise ValueError(f"cond must be >= 1, got {cond!r}")
        if not reg >= 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        Q, _ = torch.linalg.qr(randn(dy, dy))
        eigs = torch.linspace(1.0 / cond, 1.0, dy, dtype=torch.float64)
        A = (Q * eigs) @ Q.T
        A = 0.5 * (A + A.T)
        B = coupling * randn(dy, dx) / dx**0.5
        b = randn(dy)
        yt = randn(dy)
        self.dtype = dtype
        self.A, self.B, self.b, self.y_target = (t.to(dtype) for t in (A, B, b, yt))
        self.reg = float(reg)
        self.L_inner = float(eigs.max())
        self.mu_inner = float(eigs.min())
        # closed forms in float64
        J = torch.linalg.solve(A, B)
        H = J.T @ J + reg * torch.eye(dx, dtype=torch.float64)
        y0 = torch.linalg.solve(A, b)
        self._J, self._H, self._Ainv_b = J, H, y0
        x_star = torch.linalg.lstsq(H, -J.T @ (y0 - yt)).solution
        ev = torch.linalg.eigvalsh(H)
        self.L_outer, self.mu_outer = float(ev.max()), float(ev.min())
        self.x_star = x_star.to(dtype)

        self.n_batches = n_batches
        self.const = 0.0
        if n_batches is None:
            outer_data = inner_data = None
        else:
            if n_batches < 2:
                raise ValueError(f"n_batches must be >= 2 (or None for the deterministic problem), got {n_batches}")
            S = randn(n_batches, dy, dy)
            S = 0.5 * (S + S.transpose(1, 2))
            S = S - S.mean(0)
            smax = float(torch.linalg.matrix_norm(S, ord=2).max())
            S = S * (noise * self.mu_inner * 0.9 / max(smax, 1e-30))  # every A_k stays positive definite
            NB = randn(n_batches, dy, dx) / dx**0.5
            NB = (NB - NB.mean(0)) * noise * coupling
            nb = randn(n_batches, dy)
            nb = (nb - nb.mean(0)) * noise
            nt = randn(n_batches, dy)
            nt = (nt - nt.mean(0)) * noise
            self.const = float(0.5 * (nt**2).sum(1).mean())
            inner_data = [
                ((A + S[k]).to(dtype), (B + NB[k]).to(dtype), (b + nb[k]).to(dtype)) for k in range(n_batches)
            ]
            outer_data = [((yt + nt[k]).to(dtype),) for k in range(n_batches)]
        self.outer_star = self.outer_value(self.x_star)

        def outer(x: Tensor, y: Tensor, batch: Any) -> Tensor:
            target = self.y_target if batch is None else batch[0]
            return 0.5 * ((y - target) ** 2).sum() + 0.5 * self.reg * (x**2).sum()

        def inner(x: Tensor, y: Tensor, batch: Any) -> Tensor:
            A_, B_, b_ = (self.A, self.B, self.b) if batch is None else batch
            return 0.5 * y @ (A_ @ y) - y @ (B_ @ x + b_)

        self.problem = BilevelProblem(
            outer,
            inner,
            torch.zeros(dx, dtype=dtype),
            torch.zeros(dy, dtype=dtype),
            outer_data=outer_data,
            inner_data=inner_data,
        )

    def y_star(self, x: Tensor) -> Tensor:
        """The inner solution :math:`y^*(x) = A^{-1}(Bx + b)`."""
        x64 = x.detach().to(torch.float64)
        return (self._Ainv_b + self._J @ x64).to(x.dtype)

    def hypergradient(self, x: Tensor) -> Tensor:
        r""":math:`\nabla F(x) = J^\top (y^*(x) - y_t) + \rho x` (full data)."""
        x64 = x.detach().to(torch.float64)
        ys = self._Ainv_b + self._J @ x64
        return (self._J.T @ (ys - self.y_target.to(torch.float64)) + self.reg * x64).to(x.dtype)

    def outer_value(self, x: Tensor) -> float:
        """:math:`F(x) = f(x, y^*(x))` on the full data (including the stochastic constant)."""
        x64 = x.detach().to(torch.float64)
        ys = self._Ainv_b + self._J @ x64
        val = 0.5 * ((ys - self.y_target.to(torch.float64)) ** 2).sum() + 0.5 * self.reg * (x64**2).sum()
        return float(val) + self.const

    def __repr__(self) -> str:
        return (
            f"QuadraticBilevel(dx={self.problem.dx}, dy={self.problem.dy}, cond={self.L_inner / self.mu_inner:.3g}, "
            f"n_batches={self.n_batches})"
        )


def quadratic(
    dx: int = 10,
    dy: int = 20,
    cond: float = 10.0,
    reg: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    n_batches: int | None = None,
    noise: float = 0.5,
    coupling: float = 0.3,
) -> QuadraticBilevel:
    r"""A quadratic bilevel problem with closed forms (benchopt/benchmark_bilevel's ``quadratic`` design).

    Args:
        dx, dy: sizes of the upper and lower variables.
        cond: condition number of the inner Hessian :math:`A` (eigenvalues evenly spaced in ``[1/cond, 1]``).
        reg: :math:`\rho`, the outer ridge term (makes :math:`F` strongly convex).
        seed: random seed of the data.
        dtype: dtype of the problem's tensors (closed forms are computed in float64).
        n_batches: ``None`` for the deterministic problem; an integer ``>= 2`` splits
            the data into that many minibatches (a list of batches for ``outer_data`` and
            ``inner_data``) whose means give the deterministic problem.
        noise: relative size of the batch-to-batch variation (stochastic version).
        coupling: scale of :math:`B` (how strongly ``y*`` moves with ``x``).

    Returns:
        A :class:`QuadraticBilevel` with ``.problem``, ``.x_star``, ``.y_star(x)``,
        ``.hypergradient(x)``, ``.outer_value(x)`` and ``.outer_star``.

    Example:
        >>> q = quadratic(dx=3, dy=4)
        >>> bool(q.hypergradient(q.x_star).abs().max() < 1e-10)
        True
    """
    return QuadraticBilevel(dx, dy, cond, reg, seed, dtype, n_batches, noise, coupling)
