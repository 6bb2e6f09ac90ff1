r"""AID: approximate implicit differentiation with an inner problem solved to tolerance.

The baseline of Ghadimi & Wang 2018 ("Approximation Methods for Bilevel
Programming", Algorithm 1 with the hypergradient of eq. (2.3)), Pedregosa 2016
(HOAG, Algorithm 1) and Grazzi et al. 2020 ("On the Iteration Complexity of Hypergradient
Computation", Algorithm AID-CG): per outer step

1. solve the inner problem from the previous solution (warm start) until
   :math:`\|\nabla_y g(x, y)\| \le` ``inner_tol``;
2. solve :math:`\nabla^2_{yy} g\, w = \nabla_y f` by conjugate gradients (warm-started at the
   previous ``w``: the adjoint changes slowly from one outer step to the next) and form
   :math:`\hat\nabla F = \nabla_x f - \nabla^2_{xy} g\, w`;
3. move ``x`` along :math:`-\hat\nabla F` (fixed step or Adam), or along the L-BFGS direction
   (Nocedal & Wright 2006, Alg. 7.4), with an Armijo backtracking line search on
   :math:`F(x) = f(x, y^*(x))` on deterministic problems.

Inner solvers (``inner``): ``"gd"`` (gradient steps, the classical choice and the only one for
minibatches), ``"newton_cg"`` (Newton-CG on the whole inner data, Nocedal & Wright Alg. 7.1),
``"newton"`` (Newton with the dense ``dy × dy`` Hessian from one batched backward and a Cholesky
factorisation that the adjoint solve reuses; for small ``dy``), or any :mod:`curvlab` solver
instance (e.g. ``curvlab.solvers.NewtonCG()``). With the Newton inner solvers the last Newton
iteration's autograd graph is *at* the returned ``y``, so the adjoint CG products and the mixed
product :math:`\nabla^2_{xy} g\, w` reuse it (no extra forward pass).

The line search compares :math:`\tilde F(x) = f(x, y) - w^\top \nabla_y g(x, y)` (the value corrected
to first order for the inner error, the Lagrangian of the IFT), so an inner solution accurate to
``inner_tol`` still gives decreases far below ``inner_tol`` (F itself is off by :math:`O(\|y - y^*\|)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import BilevelSolver, _check_positive, base_state, options
from ._common import (
    check_solve,
    implicit_hypergradient,
    inner_gd,
    inner_newton,
    inner_with_solver,
    lbfgs_direction,
    outer_update,
    set_inner_lr,
)
from ._problem import BilevelProblem

__all__ = ["AID"]

#: ``inner="auto"`` uses the dense Newton inner solver up to this many inner variables
DENSE_MAX = 100
_INNER = ("auto", "gd", "newton_cg", "newton")
_OPTIMIZERS = ("auto", "sgd", "adam", "lbfgs")


@options
class AID(BilevelSolver):
    r"""Approximate implicit differentiation (AID-CG; Grazzi et al. 2020, Ghadimi & Wang 2018, HOAG).

    Args:
        lr: outer step size. Fixed steps (``"sgd"``, ``"adam"`` without line search): ``None`` means ``0.1``.
            With the line search it is the first trial step (``None``: 1, then twice the last accepted
            step); with ``"lbfgs"`` it scales only the first, steepest-descent direction (``None``:
            :math:`1/\|\hat\nabla F\|`), later trials start at the unit quasi-Newton step.
        inner: ``"auto"``, ``"gd"``, ``"newton_cg"``, ``"newton"`` or a :mod:`curvlab` solver instance.
            ``"auto"`` is ``"gd"`` for minibatch data or a ``y_set``, else ``"newton"`` when
            ``dy <= 100`` and ``"newton_cg"`` above.
        inner_lr: step of ``"gd"``; ``None`` uses ``1/L`` (power-iteration estimate of
            :math:`\lambda_{\max}(\nabla^2_{yy} g)` at the start).
        inner_steps: cap on inner iterations (gradient steps, Newton steps or solver iterations) per outer step.
        inner_tol: stop the inner solve when :math:`\|\nabla_y g\| \le` ``inner_tol``.
        inner_rtol: with the Newton / solver inner solvers the tolerance is also tightened to
            ``inner_rtol`` times the norm of the last hypergradient (HOAG's decreasing tolerances,
            Pedregosa 2016, Theorem 2), so the inner error never dominates the hypergradient near a
            solution; Newton's local quadratic convergence makes this cheap.
        linear_solve: linear solve for :math:`\nabla^2_{yy} g\, w = \nabla_y f` (``"cg"`` or any
            :data:`implicit.SOLVES` name / callable). With ``inner="newton"`` the adjoint reuses the
            Cholesky factor instead (``linear_solve="dense"`` asks for that with any inner solver).
        solve_tol: relative residual tolerance of the solve (and of Newton-CG's last steps).
        solve_maxiter: iteration cap of the solve (and of each Newton-CG step's CG).
        warm_start: warm-start CG at the previous ``w``.
        optimizer: ``"auto"``, ``"sgd"``, ``"adam"`` or ``"lbfgs"``. ``"auto"`` is ``"lbfgs"`` on deterministic
            problems without an ``x_set``, else ``"sgd"``.
        line_search: Armijo backtracking on :math:`F` (deterministic problems only); ``None`` turns it on
            for ``"lbfgs"`` and for ``"sgd"`` on deterministic problems when ``lr`` is not given.
        memory: L-BFGS memory (pairs kept).
        c1: Armijo sufficient-decrease constant.
        max_backtracks: trials per line search; a line search that finds no decrease stops the run
            with status ``"line_search_failed"`` (usually the limit of the inner precision).
        betas: Adam's moment decay rates.

    Raises:
        ValueError: bad values; at ``init``, a line search or L-BFGS on minibatch data, L-BFGS with an
            ``x_set``, or a Newton inner solver with a ``y_set``.

    Example:
        >>> from bilevel.problems import quadratic
        >>> q = quadratic(dx=3, dy=4)
        >>> r = AID().solve(q.problem, max_iter=50, tol=1e-10)
        >>> bool((r.x_flat - q.x_star).norm() < 1e-6 * q.x_star.norm())
        True
    """

    lr: float | None = None
    inner: Any = "auto"
    inner_lr: float | None = None
    inner_steps: int = 100
    inner_tol: float = 1e-6
    inner_rtol: float = 1e-3
    linear_solve: str | Callable[..., Any] = "cg"
    solve_tol: float = 1e-6
    solve_maxiter: int | None = 100
    warm_start: bool = True
    optimizer: str = "auto"
    line_search: bool | None = None
    memory: int = 10
    c1: float = 1e-4
    max_backtracks: int = 30
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _check_positive(self, "solve_tol", "c1")
        _check_positive(self, "inner_tol", "inner_rtol", allow_zero=True)
        for n in ("lr", "inner_lr"):
            if getattr(self, n) is not None:
                _check_positive(self, n)
        for n in ("inner_steps", "memory", "max_backtracks"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AID.{n} must be an integer >= 1, got {v!r}")
        if self.linear_solve != "dense":
            check_solve(self, "linear_solve")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"AID.optimizer must be one of {list(_OPTIMIZERS)}, got {self.optimizer!r}")
        named = isinstance(self.inner, str) and self.inner in _INNER
        if not named and not callable(getattr(self.inner, "solve", None)):
            raise ValueError(
                f"AID.inner must be one of {list(_INNER)} or a curvlab solver instance, got {self.inner!r}"
            )
        if self.line_search not in (None, True, False):
            raise ValueError(f"AID.line_search must be True, False or None (auto), got {self.line_search!r}")

    # ----------------------------------------------------------- resolved options
    def inner_method(self, problem: BilevelProblem) -> str:
        """The inner solver used on ``problem``: ``"gd"``, ``"newton_cg"``, ``"newton"`` or ``"solver"``."""
        if not isinstance(self.inner, str):
            return "solver"
        if self.inner != "auto":
            return self.inner
        if problem.stochastic or problem.y_set is not None:
            return "gd"
        return "newton" if problem.dy <= DENSE_MAX else "newton_cg"

    def outer_method(self, problem: BilevelProblem) -> tuple[str, bool]:
        """``(optimizer, line_search)`` used on ``problem``."""
        opt = self.optimizer
        if opt == "auto":
            opt = "lbfgs" if not problem.stochastic and problem.x_set is None else "sgd"
        ls = self.line_search
        if ls is None:
            ls = opt == "lbfgs" or (opt == "sgd" and not problem.stochastic and self.lr is None)
        return opt, bool(ls)

    def _check(self, problem: BilevelProblem) -> None:
        opt, ls = self.outer_method(problem)
        if (ls or opt == "lbfgs") and problem.stochastic:
            raise ValueError(
                "AID: line_search=True and optimizer='lbfgs' need deterministic data (one batch); "
                "use optimizer='sgd' or 'adam' with line_search=False on minibatches"
            )
        if opt == "lbfgs" and problem.x_set is not None:
            raise ValueError("AID: optimizer='lbfgs' does not handle x_set; use optimizer='sgd' (projected steps)")
        if self.inner_method(problem) in ("newton", "newton_cg", "solver") and problem.y_set is not None:
            raise ValueError("AID: Newton inner solvers do not handle y_set; use inner='gd' (projected steps)")

    # ------------------------------------------------------------------ pieces
    def _evaluate(
        self, problem: BilevelProblem, x: Tensor, y: Tensor, w: Tensor | None, new: dict[str, Any]
    ) -> dict[str, Any]:
        """Inner solve at ``x`` from ``y``, then the hypergradient: ``{y, hg, w, fval, res, ...}``."""
        method = self.inner_method(problem)
        tol = self.inner_tol
        if method == "gd":
            y, res = inner_gd(problem, x, y, new["inner_lr"], self.inner_steps, new, tol=self.inner_tol)
            graph, inner_iters, ib = None, float("nan"), problem.draw_inner(new["draws_inner"])
            new["draws_inner"] += 1
        else:
            if new.get("hg") is not None:  # HOAG-style decreasing tolerance: inner error below the hypergradient's
                tol = min(tol, self.inner_rtol * float(torch.linalg.vector_norm(new["hg"])))
            if method == "solver":
                y, graph, res, inner_iters = inner_with_solver(problem, x, y, self.inner, tol, self.inner_steps, new)
            else:
                y, graph, res, inner_iters = inner_newton(
                    problem, x, y, tol, self.inner_steps, new, method, self.solve_maxiter
                )
            ib = graph.batch
        ob = problem.draw_outer(new["draws_outer"])
        new["draws_outer"] += 1
        solve = self.linear_solve
        if method == "newton" and solve == "cg":
            solve = "dense"
        opts: dict[str, Any] = {}
        if solve in ("cg", "minres", "gmres", "normal_cg"):
            opts = {"tol": self.solve_tol, "maxiter": self.solve_maxiter}
            if self.warm_start and w is not None:
                opts["x0"] = w
        hg, w, fval, info = implicit_hypergradient(problem, x, y, ob, ib, solve, new, graph=graph, **opts)
        corr = fval if graph is None else fval - w @ graph.gy  # first-order inner-error correction of F
        return {
            "y": y.detach(),
            "hg": hg,
            "w": w.detach(),
            "fval": fval,
            "fcorr": corr,
            "res": res,
            "inner_ok": method == "gd" or (math.isfinite(res) and res <= max(tol, 1e-14)),
            "solve_iters": info.n_iter if info is not None else float("nan"),
            "inner_iters": inner_iters,
        }

    # ------------------------------------------------------------------ contract
    def default_rtol(self, problem: BilevelProblem) -> float:
        """Relative hypergradient tolerance of the default stop rule (tight: exact hypergradients)."""
        return 1e-8

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        self.check_problem(problem)
        self._check(problem)
        state = base_state(problem, w=None, hg=None, adam_m=None, adam_v=None, adam_t=0, lbfgs_s=[], lbfgs_y=[])
        if self.inner_method(problem) == "gd":
            set_inner_lr(problem, state, self.inner_lr)
        else:
            state["inner_lr"] = float("nan")
        opt, ls = self.outer_method(problem)
        if ls or opt == "lbfgs":  # the line search needs F at x: solve there now (the first step reuses it)
            ev = self._evaluate(problem, state["x"], state["y"], None, state)
            state.update(
                y=ev["y"],
                w=ev["w"],
                hg=ev["hg"],
                fcorr=ev["fcorr"],
                outer_value=ev["fval"],
                inner_residual=ev["res"],
            )
        else:
            state["outer_value"] = problem.f(state["x"], state["y"], problem.draw_outer(0))
        return state

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        opt, ls = self.outer_method(problem)
        x = state["x"]
        if state.get("hg") is None:  # fixed-step path: inner solve and hypergradient at the current x
            ev = self._evaluate(problem, x, state["y"], state.get("w"), new)
            hg, y, w = ev["hg"], ev["y"], ev["w"]
            log = {"solve_iters": ev["solve_iters"], "inner_iters": ev["inner_iters"]}
            res = ev["res"]
        else:
            hg, y, w, res = state["hg"], state["y"], state["w"], state["inner_residual"]
            log = {}
        hg_norm = float(torch.linalg.vector_norm(hg))
        if not ls:
            x_new = problem.project_x(outer_update(x, hg, state, new, self.lr or 0.1, opt, self.betas))
            new.update(
                x=x_new.detach(),
                y=y,
                w=w,
                hg=None,
                iter=state["iter"] + 1,
                outer_value=problem.f(x_new, y, problem.draw_outer(max(new["draws_outer"] - 1, 0))),
                hypergrad_norm=hg_norm,
                inner_residual=res,
                log=log,
            )
            return new
        return self._line_search_step(problem, state, new, opt, hg, hg_norm, y, w)

    def _line_search_step(
        self,
        problem: BilevelProblem,
        state: dict[str, Any],
        new: dict[str, Any],
        opt: str,
        hg: Tensor,
        hg_norm: float,
        y: Tensor,
        w: Tensor,
    ) -> dict[str, Any]:
        x = state["x"]
        S, Y = list(state["lbfgs_s"]), list(state["lbfgs_y"])
        if opt == "lbfgs":
            d = lbfgs_direction(hg, S, Y)
            if not float(hg @ d) < 0:  # not a descent direction: restart the memory
                S, Y, d = [], [], -hg
            if S:
                t = 1.0
            else:
                t = self.lr if self.lr is not None else 1.0 / max(hg_norm, 1e-300)
        else:
            d = -hg
            last = state.get("ls_step")
            t = (self.lr if self.lr is not None else 1.0) if last is None else 2.0 * float(last)
        longest = state.get("ls_length")
        if longest is not None:  # safeguard: a step at most 10x longer than the longest accepted so far
            t = min(t, 10.0 * float(longest) / max(float(torch.linalg.vector_norm(d)), 1e-300))
        f0 = float(state["fcorr"])
        n_trials = 0
        all_nonfinite = True  # every trial gave a non-finite F or hypergradient: stop with "nan", not a failed search
        while True:
            n_trials += 1
            x_t = problem.project_x(x + t * d).detach()
            ev = self._evaluate(problem, x_t, y, w, new)
            ft = float(ev["fcorr"])
            if math.isfinite(ft) and bool(torch.isfinite(ev["hg"]).all()):
                all_nonfinite = False
            # accept on sufficient decrease, with an inner solve that converged (else the step is too long)
            armijo = ft <= f0 + self.c1 * float(hg @ (x_t - x))
            # within F's rounding noise, a smaller hypergradient decides (Hager & Zhang 2005's approximate test)
            noise = ft <= f0 + 1e-12 * max(1.0, abs(f0)) and float(torch.linalg.vector_norm(ev["hg"])) < hg_norm
            if ev["inner_ok"] and math.isfinite(ft) and (armijo or noise):
                break
            if n_trials >= self.max_backtracks:
                if all_nonfinite:
                    new.update(
                        status="nan",
                        message=f"non-finite outer value or hypergradient in all {n_trials} line-search trials; "
                        "returning the last finite state",
                    )
                    return new
                new.update(
                    status="line_search_failed",
                    message=(
                        f"Armijo line search found no decrease of F in {n_trials} trials (at the limit of the inner "
                        "precision? lower inner_tol)"
                    ),
                )
                return new
            t *= 0.5
        if opt == "lbfgs":
            s, yv = x_t - x, ev["hg"] - hg
            sy = float(s @ yv)
            if sy > 1e-10 * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(yv)):
                S, Y = (S + [s])[-self.memory :], (Y + [yv])[-self.memory :]
        new.update(
            x=x_t,
            y=ev["y"],
            w=ev["w"],
            hg=ev["hg"],
            fcorr=ev["fcorr"],
            lbfgs_s=S,
            lbfgs_y=Y,
            ls_step=t,
            ls_length=max(float(torch.linalg.vector_norm(x_t - x)), float(state.get("ls_length") or 0.0)),
            iter=state["iter"] + 1,
            outer_value=ev["fval"],
            hypergrad_norm=float(torch.linalg.vector_norm(ev["hg"])),
            inner_residual=ev["res"],
            log={
                "step_size": t,
                "ls_trials": n_trials,
                "solve_iters": ev["solve_iters"],
                "inner_iters": ev["inner_iters"],
            },
        )
        return new
