"""Hessian-free Newton: truncated CG on the Newton system with an Armijo line search."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import int_fields, positive_fields
from ..linalg import cg
from ..problems import ALL, Problem
from ._base import Solver, options
from ._common import fresh_state, point, search_stop
from .line_search import Armijo

__all__ = ["NewtonCG"]


@options
class NewtonCG(Solver):
    r"""Line-search Newton-CG (Nocedal & Wright 2006, Alg. 7.1), matrix-free.

    Each iteration builds the Hessian operator at :math:`x_k` (one gradient graph,
    reused by every CG product) and solves :math:`(H_k + \lambda I) d = -g_k` by
    conjugate gradients to the forcing tolerance
    :math:`\|r\| \le \eta_k \|g_k\|`, :math:`\eta_k = \min(0.5, \sqrt{\|g_k\|/\|g_0\|})`
    (superlinear convergence, N&W eq. 7.3; the paper's :math:`\sqrt{\|g_k\|}` measured relative to the
    initial gradient so that the iterates do not depend on the scale of :math:`f` — ours).
    Negative curvature is handled as in
    Steihaug's truncated CG: CG stops at the first direction with
    :math:`pᵀHp \le 0` and returns the iterate so far, or :math:`-g_k` if that
    happens on the first CG step. The step length comes from Armijo backtracking
    from :math:`t = 1` (Alg. 3.1). Deterministic: uses the whole dataset.

    Args:
        damping: :math:`\lambda \ge 0` added to the Hessian.
        cg_tol: fixed relative CG tolerance; ``None`` uses the forcing sequence above.
        cg_maxiter: CG iteration cap per Newton step.
        line_search: Armijo backtracking on/off (off takes the full step).
        c1: Armijo constant (N&W default 1e-4).
        shrink: backtracking factor.
        max_backtracks: trials per line search.
        hessian_mode: product mode of :func:`curvlab.linops.hessian`.
    """

    damping: float = 0.0
    cg_tol: float | None = None
    cg_maxiter: int = 250
    line_search: bool = True
    c1: float = 1e-4
    shrink: float = 0.5
    max_backtracks: int = 40
    hessian_mode: str = "auto"

    def __post_init__(self) -> None:
        positive_fields(self, "damping", allow_zero=True)
        positive_fields(self, "c1", "shrink")
        if self.cg_tol is not None:
            positive_fields(self, "cg_tol")
        int_fields(self, "cg_maxiter", "max_backtracks")

    def init(self, problem: Problem) -> dict[str, Any]:
        state = fresh_state(problem)
        state["grad_norm0"] = float(state["grad_norm"])
        return state

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        x, g, f0 = state["x"], state["grad"], state["value"]
        H = problem.hessian(x, ALL, mode=self.hessian_mode)
        A = H.damped(self.damping) if self.damping > 0 else H
        gnorm = float(state["grad_norm"])
        g0 = float(state.get("grad_norm0", 1.0))
        eta = self.cg_tol if self.cg_tol is not None else min(0.5, math.sqrt(gnorm / g0) if g0 > 0 else 0.5)
        res = cg(A, -g, tol=eta, maxiter=self.cg_maxiter)
        d = res.x
        if res.negative_curvature and not bool(d.abs().sum() > 0):
            d = -g
        slope = torch.dot(g, d)
        if not slope < 0:  # not a descent direction (e.g. CG broke down): fall back to steepest descent
            d, slope = -g, -torch.dot(g, g)
        matvecs = state["matvecs"] + res.n_matvecs
        if self.line_search:
            ls = Armijo(self.c1, self.shrink, self.max_backtracks).search(
                lambda t: problem.value(x + t * d, ALL), f0, slope, 1.0
            )
            if not ls.success:
                return {**state, "matvecs": matvecs, **search_stop(ls, "Newton-CG direction")}
            t = ls.t
        else:
            t = 1.0
        new = point(problem, x + t * d, ALL)
        log = {"cg_iters": res.n_iter, "negative_curvature": bool(res.negative_curvature)}
        return {**state, **new, "iter": state["iter"] + 1, "step_size": t, "matvecs": matvecs, "log": log}
