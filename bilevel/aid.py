r"""AID: approximate implicit differentiation with the inner problem solved to a tolerance.

Ghadimi & Wang 2018 ("Approximation Methods for Bilevel Programming", Algorithm 1 with the
hypergradient of eq. (2.3)), Pedregosa 2016 (HOAG, Algorithm 1) and Grazzi et al. 2020 ("On the
Iteration Complexity of Hypergradient Computation", AID-CG): per outer step

1. solve the inner problem from the previous solution (warm start) to a tolerance;
2. solve :math:`\nabla^2_{yy} g\, w = \nabla_y f` by conjugate gradients warm-started at the
   previous ``w`` (the adjoint changes slowly between outer steps) and form
   :math:`\hat\nabla F = \nabla_x f - \nabla^2_{xy} g\, w`;
3. move ``x``.

A preset of :class:`bilevel.Composite`: inner solve by :func:`bilevel._inner.solve_inner`
(Newton-CG, dtype-aware reachable tolerance, capped), the adjoint by
:func:`implicit.hypergradient` with ``curvlab.linalg.solve(method="cg")``, and on deterministic
problems an L-BFGS direction with the Armijo search of :mod:`curvlab.solvers` on
:math:`\tilde F = f - w^\top \nabla_y g` (accepting only trials whose inner solve converged).

Where the defaults differ from the papers, and why:

* Ghadimi & Wang / Grazzi et al. take fixed outer steps :math:`\beta \le 1/L_F` and a fixed number
  of inner steps; here the outer step comes from the line search (``L_F`` is unknown in
  practice) and the inner solve stops at a tolerance relative to the first inner gradient
  (:math:`\varepsilon^{2/3}` in float64, :math:`\sqrt\varepsilon` in float32 — HOAG's decreasing
  tolerances, Pedregosa 2016 Thm. 2, reduced to the one the dtype can reach; the old absolute
  1e-6 was unreachable in float32 on a network and sent every solve to its cap).
* The adjoint is ``linear_solve="auto"``: CG as in the paper, MINRES where a nonconvex inner
  Hessian has negative curvature (CG's adjoint is meaningless there), a dense factorisation for
  ``dy <= 256``; it stops at :math:`\varepsilon^{2/3}` (float64) / :math:`\sqrt\varepsilon` (float32)
  with at most ``min(2 dy + 10, 1000)`` (float64) / ``100`` (float32) products.
* A line search that finds no decrease at a stationary point ends the run as ``"converged"``
  (see :mod:`bilevel._composite`) instead of failing; AID's default ``rtol`` is tight
  (:math:`\varepsilon^{2/3}` in float64) because its hypergradient is exact to the solve tolerances.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from curvlab.checks import check_choice
from curvlab.solvers import Solver

from ._base import options
from ._composite import (
    CompositeSolver,
    Config,
    resolve_optimizer,
    validate_common,
)
from ._problem import BilevelProblem

__all__ = ["AID"]

_INNER = ("auto", "gd", "newton_cg", "newton")


@options
class AID(CompositeSolver):
    r"""Approximate implicit differentiation (AID-CG; Grazzi et al. 2020, Ghadimi & Wang 2018, HOAG).

    Args:
        lr: with the line search the first trial step of the first (steepest-descent) iteration
            (``None``: a unit move of ``x``, :math:`1/\|\hat\nabla F\|`); with fixed steps the step
            (``None``: 0.1).
        inner: ``"auto"`` (Newton-CG on deterministic data, projected gradient with a ``y_set``),
            ``"newton_cg"`` / ``"newton"`` (Newton-CG), ``"gd"`` (gradient steps with ``1/L``) or a
            :mod:`curvlab` solver instance.
        inner_lr: step of the minibatch inner gradient steps (``None``: ``1/L`` by power iteration).
        inner_steps: cap on inner iterations per solve (``None``: scales with the problem, see
            :func:`bilevel._inner.solve_inner`); on minibatches the number of inner steps (``None``: 100).
        inner_tol: absolute inner gradient tolerance (``None``: only the relative one).
        inner_rtol: inner tolerance relative to the first inner gradient norm (``None``: the dtype's
            reachable default).
        linear_solve: adjoint solve: ``"auto"`` (CG, the paper's, switching to MINRES where a nonconvex
            inner Hessian shows negative curvature; a small Hessian is factored), or any
            :func:`curvlab.linalg.solve` method / callable ``solve(matvec, b, **options)``.
        solve_tol: relative residual tolerance of the adjoint (``None``: :func:`curvlab.linalg.default_tol`).
        solve_maxiter: adjoint iteration cap (``None``: ``min(2 dy + 10, 1000)``).
        warm_start: warm-start the adjoint at the previous ``w``.
        optimizer: ``"auto"`` (``"lbfgs"`` on deterministic data without ``x_set``, projected ``"gd"``
            with one, ``"sgd"`` on minibatches), ``"lbfgs"``, ``"gd"``, ``"sgd"``, ``"adam"``, ``"normalized"``.
        line_search: Armijo search on :math:`\tilde F` (``None``: with ``"lbfgs"``/``"gd"``, and for
            ``"sgd"`` on deterministic data when ``lr`` is not given).
        memory: L-BFGS pairs.
        c1: Armijo constant.
        max_backtracks: trials per search.
        betas: Adam's decays.

    Raises:
        ValueError: bad values; at ``init``, a line search on minibatches, L-BFGS with an ``x_set``,
            a Newton inner solver with a ``y_set``.

    Example:
        >>> from bilevel.problems import quadratic
        >>> q = quadratic(dx=3, dy=4)
        >>> r = AID().solve(q.problem, max_iter=50)
        >>> r.status, bool((r.x_flat - q.x_star).norm() < 1e-6 * q.x_star.norm())
        (<Status.CONVERGED: 'converged'>, True)
    """

    lr: float | None = None
    inner: Any = "auto"
    inner_lr: float | None = None
    inner_steps: int | None = None
    inner_tol: float | None = None
    inner_rtol: float | None = None
    linear_solve: str | Callable[..., Any] = "auto"
    solve_tol: float | None = None
    solve_maxiter: int | None = None
    warm_start: bool = True
    optimizer: str = "auto"
    line_search: bool | None = None
    memory: int = 10
    c1: float = 1e-4
    max_backtracks: int = 10
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        validate_common(self, "AID")
        check_choice(self.optimizer, "AID.optimizer", ("auto", "lbfgs", "gd", "sgd", "adam", "normalized"))
        named = isinstance(self.inner, str) and self.inner in _INNER
        if not named and not isinstance(self.inner, Solver):
            raise ValueError(
                f"AID.inner must be one of {list(_INNER)} or a curvlab solver instance, got {self.inner!r}"
            )

    def default_rtol(self, problem: BilevelProblem) -> float:
        """AID's relative hypergradient tolerance: eps^(2/3) in float64, else sqrt(eps)."""
        eps = torch.finfo(problem.dtype).eps
        return eps ** (2.0 / 3.0) if eps < 1e-10 else math.sqrt(eps)

    def inner_method(self, problem: BilevelProblem) -> str:
        """The inner solver on ``problem``: ``"gd"`` (minibatches, a ``y_set``), ``"newton_cg"`` or ``"solver"``."""
        if not isinstance(self.inner, str):
            return "solver"
        if self.inner == "gd" or problem.stochastic or (self.inner == "auto" and problem.y_set is not None):
            return "gd"
        return "newton_cg"

    def outer_method(self, problem: BilevelProblem) -> tuple[str, bool]:
        """``(optimizer, line_search)`` used on ``problem``."""
        cfg = self.config(problem)
        return cfg.optimizer, cfg.line_search

    def _inner_solver(self, problem: BilevelProblem) -> Any:
        if not isinstance(self.inner, str):
            return self.inner
        return "gd" if self.inner_method(problem) == "gd" else "newton"

    def config(self, problem: BilevelProblem) -> Config:
        ls = self.line_search
        if ls is None and self.optimizer == "sgd":  # old rule: SGD searches on deterministic data without lr
            ls = not problem.stochastic and self.lr is None
        opt, ls = resolve_optimizer("AID", self.optimizer, ls, problem, "sgd")
        return Config.on(
            problem,
            default_lr=0.1,
            estimator="implicit",
            inner=self._inner_solver(problem),
            inner_steps=None if problem.stochastic else self.inner_steps,
            inner_tol=self.inner_tol,
            inner_rtol=self.inner_rtol,
            sgd_steps=(self.inner_steps or 100) if problem.stochastic else None,
            inner_lr=self.inner_lr,
            solve=self.linear_solve,
            solve_tol=self.solve_tol,
            solve_maxiter=self.solve_maxiter,
            warm_start=self.warm_start,
            optimizer=opt,
            line_search=ls,
            lr=self.lr,
            memory=self.memory,
            c1=self.c1,
            max_backtracks=self.max_backtracks,
            betas=self.betas,
        )

    def _check_config(self, problem: BilevelProblem, cfg: Config) -> None:
        super()._check_config(problem, cfg)
        if (
            problem.y_set is not None
            and self.inner in ("newton", "newton_cg")
            or (problem.y_set is not None and isinstance(self.inner, Solver))
        ):
            raise ValueError("AID: Newton inner solvers do not handle y_set; use inner='gd' (projected steps)")
