r"""AID: approximate implicit differentiation with an inner problem solved to tolerance.

The baseline of Ghadimi & Wang 2018 ("Approximation Methods for Bilevel
Programming", Algorithm 1 with the hypergradient of eq. (2.3)), Pedregosa 2016
(HOAG) and Grazzi et al. 2020 ("On the Iteration Complexity of Hypergradient
Computation", Algorithm AID-CG): per outer step

1. solve the inner problem approximately from the previous solution (warm start):
   gradient descent until :math:`\|\nabla_y g(x, y)\| \le` ``inner_tol`` or ``inner_steps``;
2. solve :math:`\nabla^2_{yy} g\, w = \nabla_y f` by conjugate gradients (warm-started at the
   previous ``w``) and form :math:`\hat\nabla F = \nabla_x f - \nabla^2_{xy} g\, w`;
3. :math:`x \leftarrow \Pi_X(x - \eta \hat\nabla F)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._base import BilevelSolver, _check_positive, _count, base_state, options
from ._common import check_solve, estimate_inner_lipschitz, implicit_hypergradient, inner_gd, outer_update
from ._problem import BilevelProblem

__all__ = ["AID"]


@options
class AID(BilevelSolver):
    r"""Approximate implicit differentiation (AID-CG; Grazzi et al. 2020, Ghadimi & Wang 2018).

    Args:
        lr: outer step size :math:`\eta`.
        inner_lr: inner gradient step; ``None`` uses ``1/L`` (power-iteration estimate of
            :math:`\lambda_{\max}(\nabla^2_{yy} g)` at the start).
        inner_steps: cap on inner gradient steps per outer step.
        inner_tol: stop the inner loop when :math:`\|\nabla_y g\| \le` ``inner_tol``.
        linear_solve: linear solve for :math:`\nabla^2_{yy} g\, w = \nabla_y f` (``"cg"`` or any
            :data:`implicit.SOLVES` name / callable).
        solve_tol: relative residual tolerance of the solve.
        solve_maxiter: iteration cap of the solve.
        warm_start: warm-start CG at the previous ``w``.
        optimizer: outer optimizer, ``"sgd"`` or ``"adam"``.
    """

    lr: float = 1e-1
    inner_lr: float | None = None
    inner_steps: int = 100
    inner_tol: float = 1e-6
    linear_solve: str | Callable[..., Any] = "cg"
    solve_tol: float = 1e-6
    solve_maxiter: int | None = 100
    warm_start: bool = True
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        _check_positive(self, "lr", "solve_tol")
        _check_positive(self, "inner_tol", allow_zero=True)
        if self.inner_lr is not None:
            _check_positive(self, "inner_lr")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"AID.inner_steps must be an integer >= 1, got {self.inner_steps!r}")
        check_solve(self, "linear_solve")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"AID.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        state = base_state(problem, w=None, adam_m=None, adam_v=None, adam_t=0)
        if self.inner_lr is None:
            L, n = estimate_inner_lipschitz(problem, state["x"], state["y"], problem.draw_inner(0))
            _count(state, hvps=n)
            state["inner_lr"] = 1.0 / L
        else:
            state["inner_lr"] = float(self.inner_lr)
        state["outer_value"] = problem.f(state["x"], state["y"], problem.draw_outer(0))
        return state

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        x = state["x"]
        y, res = inner_gd(problem, x, state["y"], state["inner_lr"], self.inner_steps, new, tol=self.inner_tol)
        ob = problem.draw_outer(new["draws_outer"])
        ib = problem.draw_inner(new["draws_inner"])
        new["draws_outer"] += 1
        new["draws_inner"] += 1
        opts: dict[str, Any] = {}
        if self.linear_solve in ("cg", "minres", "gmres", "normal_cg"):
            opts = {"tol": self.solve_tol, "maxiter": self.solve_maxiter}
            if self.warm_start and state.get("w") is not None:
                opts["x0"] = state["w"]
        hg, w, _, info = implicit_hypergradient(problem, x, y, ob, ib, self.linear_solve, new, **opts)
        x = problem.project_x(outer_update(x, hg, state, new, self.lr, self.optimizer))
        new.update(
            x=x.detach(),
            y=y.detach(),
            w=w.detach(),
            iter=state["iter"] + 1,
            outer_value=problem.f(x, y, ob),
            hypergrad_norm=float(torch.linalg.vector_norm(hg)),
            inner_residual=res,
            log={"solve_iters": info.n_iter if info is not None else float("nan")},
        )
        return new
