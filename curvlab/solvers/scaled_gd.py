r"""Scaled gradient descent for factored low-rank problems: ScaledGD and ScaledGD(λ)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..checks import check_bool, positive_fields
from ..problems import Problem
from ._base import Solver, options
from ._common import batch_for, fresh_state, point

__all__ = ["ScaledGD"]


def _factor_layout(problem: Problem) -> tuple[str, list[tuple[int, int]]]:
    """``("symmetric" | "asymmetric", shapes)`` of the problem's factor parameters, or a clear error."""
    spec = problem.spec
    shapes = [tuple(s) for s in spec.shapes]
    if len(shapes) == 1 and len(shapes[0]) == 2:
        return "symmetric", shapes  # type: ignore[return-value]
    if len(shapes) == 2 and all(len(s) == 2 for s in shapes) and shapes[0][1] == shapes[1][1]:
        return "asymmetric", shapes  # type: ignore[return-value]
    raise ValueError(
        "ScaledGD needs factor parameters: one 2-D tensor X (n, r) for f(X), or a pair of 2-D tensors "
        f"(L (n1, r), R (n2, r)) with the same number of columns r for f(L, R); got shapes {[list(s) for s in shapes]}"
    )


def _right_solve(G: Tensor, F: Tensor, lam: float) -> Tensor:
    r""":math:`G (F^\top F + \lambda I)^{-1}` by a Cholesky solve of the small ``(r, r)`` system."""
    P = F.T @ F
    if lam > 0:
        P = P + lam * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    C, info = torch.linalg.cholesky_ex(P)
    if int(info) == 0:
        return torch.cholesky_solve(G.T, C).T
    return torch.linalg.lstsq(P, G.T).solution.T  # singular preconditioner (λ = 0, rank-deficient factor)


def scaled_direction(factors: list[Tensor], grads: list[Tensor], damping: float) -> list[Tensor]:
    r"""The preconditioned gradients of ScaledGD(λ).

    Symmetric ``[X]``: :math:`\nabla f(X)(X^\top X + \lambda I)^{-1}`. Asymmetric ``[L, R]``:
    :math:`[\nabla_L f\,(R^\top R + \lambda I)^{-1},\ \nabla_R f\,(L^\top L + \lambda I)^{-1}]`,
    both from the same (old) ``L, R``. A singular preconditioner (``λ = 0`` and a rank-deficient
    factor) is applied as its least-squares pseudo-inverse.
    """
    if len(factors) == 1:
        return [_right_solve(grads[0], factors[0], damping)]
    L, R = factors
    return [_right_solve(grads[0], R, damping), _right_solve(grads[1], L, damping)]


@options
class ScaledGD(Solver):
    r"""ScaledGD (Tong, Ma & Chi 2021) and ScaledGD(λ) (Xu, Shen, Ma & Chi 2023) for factored objectives.

    For an objective of one factor :math:`X \in \mathbb R^{n\times r}` (e.g. the symmetric
    matrix sensing loss :math:`\frac1{4m}\|\mathcal A(XX^\top) - y\|^2`), ScaledGD(λ)
    (Xu et al. 2023, Algorithm 1, eq. 7) iterates

    .. math::  X_{t+1} = X_t - \eta\, \nabla f(X_t)\,(X_t^\top X_t + \lambda I)^{-1},

    and for a pair :math:`(L, R)` (e.g. :math:`\frac1{2m}\|\mathcal A(LR^\top) - y\|^2`)
    ScaledGD (Tong et al. 2021, Algorithm 1, eq. 4 — there with :math:`\lambda = 0`) updates
    both factors simultaneously from the old iterate:

    .. math::
        L_{t+1} = L_t - \eta\,\nabla_L f(L_t, R_t)\,(R_t^\top R_t + \lambda I)^{-1},\qquad
        R_{t+1} = R_t - \eta\,\nabla_R f(L_t, R_t)\,(L_t^\top L_t + \lambda I)^{-1}.

    The damping :math:`\lambda > 0` keeps the preconditioner invertible when the factor is
    overparameterised (:math:`r > r_\star`) or started small; with :math:`\lambda = 0`
    (the original ScaledGD) the rank-deficient case falls back to a pseudo-inverse.
    Works on any :class:`~curvlab.Minimize` problem whose parameters are one 2-D tensor or
    a pair (tuple / list / two-entry dict) of 2-D tensors with the same number of columns;
    on an iterable of batches each step draws the next batch (stochastic ScaledGD).

    Adaptive damping (``adaptive_damping=True``, the default): the step uses
    :math:`\lambda_t = \min(\lambda, \sqrt{2 f(X_t)})` instead of the fixed :math:`\lambda`, the
    :math:`\lambda_t \propto \sqrt{f(X_t)}` of PrecGD (Zhang, Fattahi & Zhang, "Preconditioned Gradient
    Descent for Over-Parameterized Nonconvex Matrix Factorization", NeurIPS 2021, Algorithm 1 / eq. 6),
    capped by the user's :math:`\lambda`. With a fixed :math:`\lambda` the spurious directions of an
    overparameterised factor decay only like :math:`\lambda/(\eta t)`, so the error stalls (matrix
    sensing, κ = 1000, λ = 0.1σ_min: 2e-6 after 300 iterations); :math:`\lambda_t \to 0` with the residual
    removes that tail and keeps the κ-independent rate (the same instance: ~1e-15). While :math:`f` is
    large the step is ScaledGD(λ) unchanged, and with ``damping=0`` (plain ScaledGD) nothing changes. It
    assumes the objective's minimum is near 0 (factorization and sensing losses, noiseless or not); a
    negative objective value falls back to :math:`\lambda`. ``adaptive_damping=False`` is Xu et al.'s fixed
    :math:`\lambda`.

    Defaults: ``lr = 0.5`` is the step size of Tong et al.'s experiments (§5,
    :math:`\eta = 0.5`); Xu et al. (Theorem 2) take :math:`\eta \le c_\eta` a small
    constant and :math:`\lambda` a small multiple of :math:`\sigma_{\min}(M_\star)`,
    :math:`\tfrac{1}{100} c_\lambda\sigma_{\min} \le \lambda \le c_\lambda\sigma_{\min}`. The
    solver cannot know :math:`\sigma_{\min}(M_\star)`, so ``damping`` defaults to 0 (plain
    ScaledGD); for ScaledGD(λ) pass e.g. ``damping=1e-6 * sigma_min``, the value
    ``examples/matrix_sensing.py`` uses (with the adaptive damping): from a small random start
    :math:`X^\top X \ll \lambda`, so the first steps are gradient steps of length :math:`\eta/\lambda`, and
    :math:`\lambda = 0.1\sigma_{\min}` with :math:`\eta = 0.5` diverges there at κ = 100 (see that example).

    Args:
        lr: step size :math:`\eta`.
        damping: :math:`\lambda \ge 0` (the cap of :math:`\lambda_t` with ``adaptive_damping``).
        adaptive_damping: :math:`\lambda_t = \min(\lambda, \sqrt{2f})` (PrecGD) instead of a fixed :math:`\lambda`.

    Raises:
        ValueError: on a non-positive ``lr``, a negative ``damping``, or (at ``init``) parameters
            that are not one 2-D factor or a pair of 2-D factors with equal column counts.

    Example:
        >>> import torch, curvlab as cl
        >>> inst = cl.problems.matrix_sensing(20, 2, kappa=10.0, init="spectral", seed=0)
        >>> res = cl.solvers.ScaledGD(lr=0.5).solve(inst.problem(), max_iter=100, tol=1e-12)
        >>> inst.relative_error(res.params) < 1e-8
        True
    """

    lr: float = 0.5
    damping: float = 0.0
    adaptive_damping: bool = True

    def __post_init__(self) -> None:
        positive_fields(self, "lr")
        positive_fields(self, "damping", allow_zero=True)
        check_bool(self.adaptive_damping, "ScaledGD.adaptive_damping")

    def damping_at(self, value: float) -> float:
        r"""The damping of a step from a point with objective ``value``: :math:`\min(\lambda, \sqrt{2f})` (or λ)."""
        lam = float(self.damping)
        if not self.adaptive_damping or lam == 0 or not value >= 0:
            return lam
        return min(lam, math.sqrt(2.0 * value))

    def init(self, problem: Problem) -> dict[str, Any]:
        layout, _ = _factor_layout(problem)
        return fresh_state(problem, layout=layout)

    def direction(self, problem: Problem, x: Tensor, grad: Tensor, damping: float | None = None) -> Tensor:
        """The flat preconditioned gradient at flat ``x`` (the step is ``-lr`` times it) for λ = ``damping``.

        ``damping`` defaults to ``self.damping``.
        """
        spec = problem.spec
        factors = list(torch.split(x, spec.numels))
        grads = list(torch.split(grad, spec.numels))
        factors = [f.view(s) for f, s in zip(factors, spec.shapes)]
        grads = [g.view(s) for g, s in zip(grads, spec.shapes)]
        lam = self.damping if damping is None else damping
        return torch.cat([d.reshape(-1) for d in scaled_direction(factors, grads, lam)])

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        if "layout" not in state:
            _factor_layout(problem)
        lam = self.damping_at(float(state["value"])) if self.adaptive_damping and self.damping > 0 else self.damping
        x_new = state["x"] - self.lr * self.direction(problem, state["x"], state["grad"], lam)
        batch, draws = batch_for(problem, state["draws"])
        new = point(problem, x_new, batch)
        return {
            **state,
            **new,
            "iter": state["iter"] + 1,
            "step_size": self.lr,
            "draws": draws,
            "log": {"damping": float(lam)},
        }
