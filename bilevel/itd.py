r"""ITD: iterative differentiation — backpropagation through ``K`` unrolled inner gradient steps.

Reverse-mode differentiation of the unrolled inner loop (Maclaurin et al. 2015;
Franceschi et al. 2017, "Forward and Reverse Gradient-Based Hyperparameter
Optimization", Algorithm 1 (reverse-HG); analysed as ITD by Grazzi et al. 2020
and Ji et al. 2021, "Bilevel Optimization: Convergence Analysis and Enhanced Design",
Algorithm 1 with ITD): with :math:`y_0` the previous inner iterate (warm start),

.. math::
    y_{k+1} = \Pi_Y\big(y_k - \beta \nabla_y g(x, y_k)\big),\ k < K, \qquad
    \hat\nabla F = \frac{d}{dx} f\big(x, y_K(x)\big),

where :math:`y_0` is treated as a constant. Each unrolled step costs one gradient on the
way forward and one Hessian-vector product on the way back. The bias decays like
:math:`(1 - \beta\mu)^K` (Grazzi et al. 2020, Theorem 2.1 with ``y_0`` fixed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import BilevelSolver, _check_positive, _count, base_state, options
from ._common import outer_update, set_inner_lr
from ._problem import BilevelProblem

__all__ = ["ITD", "itd_hypergradient"]


def itd_hypergradient(
    problem: BilevelProblem,
    x: Tensor,
    y0: Tensor,
    K: int,
    lr: float,
    outer_batch: Any,
    inner_batches: list[Any],
) -> tuple[Tensor, Tensor, Tensor, float]:
    r"""The ITD hypergradient :math:`\frac{d}{dx} f(x, y_K(x))` by reverse mode through ``K`` GD steps.

    Args:
        y0: starting inner point (a constant).
        K: unrolled steps (``len(inner_batches) == K``).
        lr: inner step size :math:`\beta`.

    Returns:
        ``(hypergradient, y_K (detached), f(x, y_K), ‖∇_y g(x, y_{K-1})‖)``.
    """
    res = float("nan")
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        y = y0.detach().requires_grad_(True)
        for b in inner_batches:
            g = problem.g_diff(xl, y, b)
            (gy,) = torch.autograd.grad(g, y, create_graph=True)
            res = float(torch.linalg.vector_norm(gy.detach()))
            y = problem.project_y(y - lr * gy)
        val = problem.f_diff(xl, y, outer_batch)
        (hg,) = torch.autograd.grad(val, xl, allow_unused=True)
    hg = torch.zeros_like(x) if hg is None else hg
    return hg.detach(), y.detach(), val.detach(), res


@options
class ITD(BilevelSolver):
    r"""Iterative differentiation through ``K`` unrolled inner gradient steps (reverse-HG).

    Args:
        lr: outer step size.
        inner_lr: inner step :math:`\beta`; ``None`` uses ``1/L`` (power-iteration estimate at the start).
        K: unrolled inner steps per outer step (memory grows linearly in ``K``).
        warm_start: start each unroll from the previous ``y_K`` (else from ``y0`` every time).
        optimizer: outer optimizer, ``"sgd"`` or ``"adam"``.
    """

    lr: float = 1e-1
    inner_lr: float | None = None
    K: int = 20
    warm_start: bool = True
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        _check_positive(self, "lr")
        if self.inner_lr is not None:
            _check_positive(self, "inner_lr")
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise ValueError(f"ITD.K must be an integer >= 1, got {self.K!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"ITD.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def default_rtol(self, problem: BilevelProblem) -> float:
        """Relative hypergradient tolerance of the default stop rule (tight: exact hypergradients)."""
        return 1e-8

    def init(self, problem: BilevelProblem) -> dict[str, Any]:
        state = base_state(problem, adam_m=None, adam_v=None, adam_t=0)
        set_inner_lr(problem, state, self.inner_lr)
        state["outer_value"] = problem.f(state["x"], state["y"], problem.draw_outer(0))
        return state

    def step(self, problem: BilevelProblem, state: dict[str, Any]) -> dict[str, Any]:
        new = dict(state)
        x = state["x"]
        batches = [problem.draw_inner(state["draws_inner"] + k) for k in range(self.K)]
        ob = problem.draw_outer(state["draws_outer"])
        new["draws_inner"] = state["draws_inner"] + self.K
        new["draws_outer"] = state["draws_outer"] + 1
        y0 = state["y"] if self.warm_start else problem.project_y(problem.y0.clone())
        hg, y, _, res = itd_hypergradient(problem, x, y0, self.K, state["inner_lr"], ob, batches)
        _count(new, grads=self.K + 1, hvps=self.K)
        x = problem.project_x(outer_update(x, hg, state, new, self.lr, self.optimizer))
        new.update(
            x=x.detach(),
            y=y,
            iter=state["iter"] + 1,
            outer_value=problem.f(x, y, ob),
            hypergrad_norm=float(torch.linalg.vector_norm(hg)),
            inner_residual=res,
            log={},
        )
        return new
