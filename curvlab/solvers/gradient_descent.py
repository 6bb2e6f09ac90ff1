"""(Stochastic) gradient descent with optional heavy-ball momentum and Armijo line search."""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_unit, int_fields, positive_fields
from ..problems import Problem
from ._base import Solver, options
from ._common import batch_for, current_batch, fresh_state, point, search_stop
from .line_search import Armijo

__all__ = ["GradientDescent"]


@options
class GradientDescent(Solver):
    r"""Gradient descent :math:`x_{k+1} = x_k - \eta\, b_k`, :math:`b_k = \mu b_{k-1} + \nabla f(x_k)`.

    Heavy-ball momentum follows ``torch.optim.SGD`` (Polyak 1964; Nesterov's variant with
    ``nesterov=True``). With ``line_search=True`` the step is chosen by Armijo backtracking
    (Nocedal & Wright 2006, Alg. 3.1) from ``lr`` on the batch the gradient came from.
    On an iterable of batches it is SGD: each step draws the next batch.

    Args:
        lr: step size :math:`\eta` (the first trial step with a line search).
        momentum: :math:`\mu \in [0, 1)`.
        nesterov: use Nesterov momentum.
        line_search: Armijo backtracking on/off.
        c1: Armijo sufficient-decrease constant.
        shrink: backtracking factor.
        max_backtracks: trials per line search.
    """

    lr: float = 1e-2
    momentum: float = 0.0
    nesterov: bool = False
    line_search: bool = False
    c1: float = 1e-4
    shrink: float = 0.5
    max_backtracks: int = 30

    def __post_init__(self) -> None:
        positive_fields(self, "lr", "c1", "shrink")
        check_unit(self.momentum, "GradientDescent.momentum")
        int_fields(self, "max_backtracks")

    def init(self, problem: Problem) -> dict[str, Any]:
        return fresh_state(problem, buf=None)

    def step(self, problem: Problem, state: dict[str, Any]) -> dict[str, Any]:
        x, g = state["x"], state["grad"]
        buf = state["buf"]
        if self.momentum > 0:
            buf = g.clone() if buf is None else self.momentum * buf + g
            d = -(g + self.momentum * buf) if self.nesterov else -buf
        else:
            d = -g
        t = self.lr
        if self.line_search:
            b = current_batch(problem, state)
            slope = torch.dot(g, d)
            if slope >= 0:
                d, slope = -g, -torch.dot(g, g)
            ls = Armijo(self.c1, self.shrink, self.max_backtracks).search(
                lambda s: problem.value(x + s * d, b), state["value"], slope, self.lr
            )
            if not ls.success:
                return {**state, **search_stop(ls)}
            t = ls.t
        x_new = x + t * d
        batch, draws = batch_for(problem, state["draws"])
        new = point(problem, x_new, batch)
        return {**state, **new, "buf": buf, "iter": state["iter"] + 1, "step_size": t, "draws": draws}
